import assert from "node:assert/strict";
import { test } from "node:test";

import { IncrementalDecoder, StopText, tokenBytes, unicodeToByte } from "../src/text.js";

// A byte-level vocabulary of one token per byte (as edgegpt's tokenizer before merges), plus one special token.
function byteTokenizer() {
  const vocab = {};
  for (const [char, byte] of unicodeToByte()) vocab[char] = byte;
  return { model: { vocab }, added_tokens: [{ id: 256, content: "<|endoftext|>" }] };
}

test("unicodeToByte covers every byte once", () => {
  const map = unicodeToByte();
  assert.equal(map.size, 256);
  assert.deepEqual([...new Set(map.values())].sort((a, b) => a - b), Array.from({ length: 256 }, (_, i) => i));
});

test("the incremental decoder never splits a character and joins to the whole text", () => {
  const table = tokenBytes(byteTokenizer());
  const text = "a😀é\tz";
  const ids = [...new TextEncoder().encode(text)];
  const decoder = new IncrementalDecoder(table);
  const pieces = ids.map((id) => decoder.step(id));
  assert.deepEqual(pieces, ["a", "", "", "", "😀", "", "é", "\t", "z"]);
  assert.equal(pieces.join("") + decoder.flush(), text);
});

test("a stream cut mid-character flushes U+FFFD, as Python's errors='replace'", () => {
  const decoder = new IncrementalDecoder(tokenBytes(byteTokenizer()));
  assert.equal(decoder.step(0xf0) + decoder.step(0x9f), "");
  assert.equal(decoder.flush(), "\ufffd");
});

test("special tokens decode to their text; unknown ids are refused", () => {
  const decoder = new IncrementalDecoder(tokenBytes(byteTokenizer()));
  assert.equal(decoder.step(256), "<|endoftext|>");
  assert.throws(() => decoder.step(999), /outside the vocabulary/);
});

test("a token that is not byte-level BPE is refused", () => {
  assert.throws(() => tokenBytes({ model: { vocab: { "a b": 0 } } }), /not byte-level BPE/);
});

test("stop strings: held back while they may start, cut at the first one", () => {
  const stops = new StopText(["\n\n", "END"]);
  assert.deepEqual(stops.add("def f():\n"), ["def f():", false]);
  assert.deepEqual(stops.add("  x\nE"), ["\n  x\n", false]);
  assert.deepEqual(stops.add("ND more"), ["", true]);
  const open = new StopText(["END"]);
  assert.deepEqual(open.add("the EN"), ["the ", false]);
  assert.equal(open.flush(""), "EN");
});
