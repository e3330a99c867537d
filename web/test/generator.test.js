// The generator on real bundles, against the Python runtime's outputs. tests/web/test_web.py writes the cases
// (bundles, prompts, the Python runtime's greedy tokens, text and tokenizer ids) to the JSON file named by
// EDGEGPT_WEB_CASES and runs this file; without it these tests skip.

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";

import { Generator } from "../edgegpt.js";

const casesFile = process.env.EDGEGPT_WEB_CASES;
const cases = casesFile ? JSON.parse(await readFile(casesFile, "utf8")) : [];
const skip = casesFile ? false : "EDGEGPT_WEB_CASES is unset (tests/web/test_web.py sets it)";

async function fileFetch(url) {
  try {
    return new Response(await readFile(fileURLToPath(url)));
  } catch {
    return new Response("", { status: 404 });
  }
}

const load = (bundle) => Generator.load(pathToFileURL(`${bundle}/`), { fetch: fileFetch, provider: "wasm", threads: 1 });

for (const c of cases) {
  test(`${c.name}: greedy tokens and text equal the Python runtime's`, { skip }, async () => {
    const gen = await load(c.bundle);
    const result = await gen.generate(c.prompt, { maxNewTokens: c.steps, ignoreEos: true });
    assert.deepEqual(result.tokens, c.tokens);
    assert.equal(result.text, c.text);
    assert.equal(result.finishReason, "length");
    assert.equal(result.timings.steps, c.steps); // prefill + one call per further token: the cache is kept
  });

  test(`${c.name}: the tokenizer gives the Python tokenizer's ids`, { skip }, async () => {
    const gen = await load(c.bundle);
    for (const [text, ids] of c.encodings) assert.deepEqual(gen.encode(text), ids, JSON.stringify(text));
  });

  test(`${c.name}: streamed pieces join to the text, stop strings cut it as in Python`, { skip }, async () => {
    const gen = await load(c.bundle);
    const pieces = [];
    const stream = gen.stream(c.prompt, { maxNewTokens: c.steps, ignoreEos: true });
    let step;
    while (!(step = await stream.next()).done) pieces.push(step.value);
    assert.equal(pieces.join(""), c.text);
    assert.deepEqual(step.value.tokens, c.tokens);
    const stopped = await gen.generate(c.prompt, { maxNewTokens: c.steps, ignoreEos: true, stop: [c.stop] });
    assert.equal(stopped.text, c.stopText);
    assert.equal(stopped.finishReason, "stop");
  });

  test(`${c.name}: a text prompt gets the BOS its tokenizer adds; every stop id ends the text`, { skip }, async () => {
    const gen = await load(c.bundle);
    const result = await gen.generate(c.prompt, { maxNewTokens: 2, ignoreEos: true });
    assert.deepEqual(result.promptTokens, c.promptTokens);
    const fromIds = await gen.generate(c.promptTokens, { maxNewTokens: 2, ignoreEos: true }); // ids: fed as given
    assert.deepEqual(fromIds.promptTokens, c.promptTokens);
    for (const s of c.stopCases) {
      const stopped = await (await load(s.bundle)).generate(c.prompt, { maxNewTokens: c.steps });
      assert.deepEqual(stopped.tokens, s.tokens);
      assert.equal(stopped.finishReason, "eos");
    }
  });

  test(`${c.name}: a seed repeats a sampled text; top-k 1 is greedy`, { skip }, async () => {
    const gen = await load(c.bundle);
    const options = { maxNewTokens: 16, temperature: 1.2, topP: 0.95, seed: 3, ignoreEos: true };
    const first = await gen.generate(c.prompt, options);
    assert.deepEqual((await gen.generate(c.prompt, options)).tokens, first.tokens);
    const topOne = await gen.generate(c.prompt, { maxNewTokens: 16, temperature: 1.5, topK: 1, seed: 1, ignoreEos: true });
    assert.deepEqual(topOne.tokens, c.tokens.slice(0, 16));
  });
}

for (const r of cases.flatMap((c) => c.refusals ?? [])) {
  test(`${r.bundle}: refused in one line, naming why`, async () => {
    await assert.rejects(load(r.bundle), (error) => error.name === "BundleError" && error.message.includes(r.reason));
  });
}

test("a prompt that does not fit the context is refused before any model call", { skip }, async () => {
  const gen = await load(cases[0].bundle);
  await assert.rejects(gen.generate("x", { maxNewTokens: gen.config.block_size }), /exceeds the model's context/);
});
