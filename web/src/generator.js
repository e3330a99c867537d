// Generator: load a verified bundle into onnxruntime-web and generate / stream text, like the Python runtime.
//
// The loop of runtime/engine/state.py `DecodeState`: prefill the prompt from an empty cache, then one token per step,
// the cache kept between steps. The cache follows the "concat" flow whatever the bundle's layout: each step's
// presents, one position longer, are fed back as the next step's pasts, and the mask grows one column per step
// (GroupQueryAttention copies the past into the present itself, which the graph allows). Why onnxruntime-web cannot
// share one buffer as past and present: docs/design.md, "12. The browser runtime". Greedy tokens equal the Python
// runtime's.

import * as ort from "onnxruntime-web";
import { Tokenizer } from "@huggingface/tokenizers";

import { ContextLengthError, tokenBudget } from "./budget.js";
import { BundleError, fetchVerified, graphFile, readManifest } from "./bundle.js";
import { makeSampler, samplingConfig } from "./sampling.js";
import { IncrementalDecoder, StopText, tokenBytes } from "./text.js";

export { ContextLengthError, ort };

/**
 * Why onnxruntime-web's WebGPU backend cannot run this bundle correctly, or null: an int4 bundle whose embedding
 * table is quantized (GatherBlockQuantized) is refused (docs/design.md, "12. The browser runtime").
 */
export function webgpuProblem(manifest) {
  const q = manifest.quantization;
  if (q?.format === "int4" && q.embedding) {
    return "onnxruntime-web's WebGPU backend misreads an int4 embedding table (GatherBlockQuantized): use provider " +
      "'wasm', or quantize with --no-embedding";
  }
  return null;
}

/**
 * Why onnxruntime-web cannot run this bundle on any backend, or null: a model with an RMSNorm over each head of q and
 * k (qk_norm, Qwen3) fails session creation in onnxruntime-web 1.30, whose GroupQueryAttention shape inference loses
 * the width of the packed q/k/v that follows the norm; the Python runtime (onnxruntime >= 1.22) runs it.
 */
export function browserProblem(manifest) {
  if (manifest.model?.qk_norm) {
    return "a q/k-norm model (qk_norm, Qwen3) is not supported in the browser: onnxruntime-web 1.30 cannot create " +
      "its GroupQueryAttention session; run it with the Python runtime (edgegpt generate / serve)";
  }
  return null;
}

/** "webgpu" when this browser offers a WebGPU adapter (and the bundle runs on it), else "wasm". */
export async function autoProvider(manifest = {}) {
  if (globalThis.navigator?.gpu && !webgpuProblem(manifest)) {
    try {
      if (await navigator.gpu.requestAdapter()) return "webgpu";
    } catch {
      // no adapter: WebAssembly
    }
  }
  return "wasm";
}

/** One sequence's KV cache, mask and positions on one session; `feed(ids)` -> the last position's logits. */
export class DecodeState {
  constructor(generator) {
    // The cache holds the KV heads (n_kv_head, omitted from the manifest when it equals n_head) of head_dim each
    // (omitted when it is n_embd / n_head): GPTConfig.to_dict leaves fields at their defaults out.
    const { n_layer: layers, n_head: nHead, n_kv_head: kvHeads, head_dim: headDim, n_embd: width } = generator.config;
    const heads = kvHeads ?? nHead;
    this.generator = generator;
    this.pastNames = [];
    this.presentNames = [];
    const kv = generator.manifest.graph.kv_cache;
    for (let i = 0; i < layers; i++) {
      for (const [past, present] of [[kv.past_key, kv.present_key], [kv.past_value, kv.present_value]]) {
        this.pastNames.push(past.replace("{}", i));
        this.presentNames.push(present.replace("{}", i));
      }
    }
    const empty = new ort.Tensor("float32", new Float32Array(0), [1, heads, 0, headDim ?? width / nHead]);
    this.pasts = this.pastNames.map(() => empty);
    this.tokens = [];
    this.steps = 0;
    this.sessionS = 0;
  }

  get length() {
    return this.tokens.length;
  }

  /** Run the model on new token ids; -> Float32Array of the vocabulary's logits at the last position. */
  async feed(ids) {
    const block = this.generator.config.block_size;
    if (!ids.length) throw new RangeError("feed needs at least one token");
    if (this.length + ids.length > block) {
      throw new ContextLengthError(`${ids.length} new tokens after ${this.length} exceed the model's context of ${block} tokens`);
    }
    const vocab = this.generator.config.vocab_size;
    for (const id of ids) {
      if (!Number.isInteger(id) || id < 0 || id >= vocab) throw new RangeError(`token id ${id} is outside the vocabulary (0..${vocab - 1})`);
    }
    const total = this.length + ids.length;
    const feeds = {
      input_ids: new ort.Tensor("int64", BigInt64Array.from(ids, BigInt), [1, ids.length]),
      attention_mask: new ort.Tensor("int64", new BigInt64Array(total).fill(1n), [1, total]),
      position_ids: new ort.Tensor("int64", BigInt64Array.from(ids, (_, t) => BigInt(this.length + t)), [1, ids.length]),
    };
    this.pastNames.forEach((name, i) => (feeds[name] = this.pasts[i]));
    const start = performance.now();
    const out = await this.generator.session.run(feeds);
    this.sessionS += (performance.now() - start) / 1000;
    this.steps += 1;
    for (const past of this.pasts) if (past.location !== "cpu") past.dispose(); // GPU buffers are freed by hand
    this.pasts = this.presentNames.map((name) => out[name]);
    this.tokens.push(...ids);
    const logits = out.logits.data; // (1, T, V) -> the last position's V
    return logits.subarray(logits.length - vocab);
  }
}

export class Generator {
  /**
   * Fetch and verify a bundle, then create the onnxruntime-web session.
   * @param {string|URL} base the bundle's URL (a directory: ends with "/")
   * @param {object} [options]
   * @param {string} [options.provider] "auto" (WebGPU when the browser has it, else WebAssembly), "wasm" or "webgpu"
   * @param {number} [options.threads] WebAssembly threads (more than 1 needs cross-origin isolation)
   * @param {Function} [options.fetch] the fetch to use (tests)
   * @returns {Promise<Generator>}
   * @throws {BundleError} a file is missing or differs from the manifest; the bundle is not one this runtime runs
   */
  static async load(base, { provider = "auto", threads, fetch: fetchFn = globalThis.fetch } = {}) {
    base = new URL(base, globalThis.location?.href);
    if (!base.pathname.endsWith("/")) base = new URL(base.href + "/");
    const manifest = await readManifest(base, fetchFn);
    const kv = manifest.graph?.kv_cache;
    if (!kv || !["concat", "shared_buffer"].includes(kv.layout)) {
      throw new BundleError(`${base}manifest.json: KV-cache layout ${JSON.stringify(kv?.layout)} is not one this runtime runs`);
    }
    if (browserProblem(manifest)) throw new BundleError(`${base}: ${browserProblem(manifest)}`);
    if ((kv.dtype ?? "float32") !== "float32") {
      throw new BundleError(`${base}: a ${kv.dtype} KV cache (an fp16 bundle) is not supported in the browser; use an fp32, int8 or int4 bundle`);
    }
    const chosen = provider === "auto" ? await autoProvider(manifest) : provider;
    if (!["wasm", "webgpu"].includes(chosen)) throw new RangeError(`provider must be auto, wasm or webgpu, got ${JSON.stringify(provider)}`);
    if (chosen === "webgpu" && webgpuProblem(manifest)) throw new BundleError(`${base}: ${webgpuProblem(manifest)}`);
    const { file, externalData } = graphFile(manifest);
    const tokenizerFile = manifest.tokenizer?.file ?? "tokenizer.json";
    const [model, tokenizerBytes, data] = await Promise.all([
      fetchVerified(base, manifest, file, fetchFn),
      fetchVerified(base, manifest, tokenizerFile, fetchFn),
      externalData ? fetchVerified(base, manifest, externalData, fetchFn) : null,
    ]);
    if (threads !== undefined) ort.env.wasm.numThreads = threads;
    const options = { executionProviders: [chosen], graphOptimizationLevel: "all" };
    if (chosen === "webgpu") {
      // The presents stay in GPU memory and come back as the next step's pasts: no cache round trip to the CPU.
      const names = [kv.present_key, kv.present_value].flatMap((n) => Array.from({ length: manifest.model.n_layer }, (_, i) => n.replace("{}", i)));
      options.preferredOutputLocation = Object.fromEntries(names.map((name) => [name, "gpu-buffer"]));
    }
    if (data) options.externalData = [{ path: externalData, data }];
    const session = await ort.InferenceSession.create(model, options);
    const tokenizerJson = JSON.parse(new TextDecoder().decode(tokenizerBytes));
    return new Generator(manifest, session, tokenizerJson, { provider: chosen, modelFile: file });
  }

  constructor(manifest, session, tokenizerJson, { provider, modelFile }) {
    this.manifest = manifest;
    this.config = manifest.model;
    this.session = session;
    this.provider = provider;
    this.modelFile = modelFile;
    this.tokenizer = new Tokenizer(tokenizerJson, {});
    // The special ids, as runtime/model/bundle.py `SpecialTokens` reads them: every stop id (Llama 3 has several;
    // an older manifest: end-of-text alone) and the BOS the tokenizer adds to a text (add_bos_token).
    const meta = manifest.tokenizer;
    this.eotId = meta.eot_token_id ?? meta.stop_token_ids?.[0];
    this.stopIds = new Set([this.eotId, ...(meta.stop_token_ids ?? [])]);
    this.bosId = meta.add_bos_token ? meta.bos_token_id : null;
    this.sampledVocab = manifest.tokenizer.sampled_vocab_size ?? this.config.vocab_size;
    this.bytesTable = tokenBytes(tokenizerJson);
  }

  /**
   * Token ids of `text` as the Python runtime's `Generator.encode` gives them: with addSpecialTokens (the default),
   * the BOS first when the bundle's tokenizer adds one; nothing else is added (a literal special token such as
   * "<|endoftext|>" is its id).
   */
  encode(text, { addSpecialTokens = true } = {}) {
    const ids = this.tokenizer.encode(text, { add_special_tokens: false }).ids;
    return addSpecialTokens && this.bosId != null ? [this.bosId, ...ids] : ids;
  }

  decode(ids) {
    const decoder = new IncrementalDecoder(this.bytesTable);
    return ids.map((id) => decoder.step(id)).join("") + decoder.flush();
  }

  newState() {
    return new DecodeState(this);
  }

  /**
   * Stream the continuation of `prompt` (text, encoded with the tokenizer's BOS if it adds one; or token ids, fed
   * as given) as text pieces that never split a character; it ends at any of the bundle's stop ids ("eos").
   * Options (camelCase forms of SamplingConfig's): maxNewTokens, temperature, topK, topP, stop, seed, ignoreEos.
   * After the loop, `stream.result` (the iterator's return value via `generate`) holds tokens and timings.
   */
  async *stream(prompt, options = {}) {
    const run = this.#request(prompt, options);
    for (;;) {
      const { value, done } = await run.next();
      if (done) return value;
      if (value) yield value;
    }
  }

  /** -> {text, tokens, finishReason, promptTokens, timings: {timeToFirstTokenS, decodeS, totalS, tokensPerS, sessionS, steps}} */
  async generate(prompt, options = {}) {
    const run = this.#request(prompt, options);
    const pieces = [];
    for (;;) {
      const { value, done } = await run.next();
      if (done) return { ...value, text: pieces.join("") };
      pieces.push(value);
    }
  }

  async *#request(prompt, options) {
    const config = samplingConfig(options);
    const started = performance.now();
    let ids = typeof prompt === "string" ? this.encode(prompt) : [...prompt];
    if (!ids.length) ids = [this.bosId ?? this.eotId]; // an empty prompt starts from BOS, else end-of-text
    tokenBudget(ids.length, config.maxNewTokens, this.config.block_size); // ContextLengthError when it does not fit
    const state = this.newState();
    const sample = makeSampler(config, this.sampledVocab);
    const decoder = new IncrementalDecoder(this.bytesTable);
    const stops = new StopText(config.stop);
    const tokens = [];
    let finishReason = "length";
    let firstAt = null;
    let logits = config.maxNewTokens ? await state.feed(ids) : null;
    while (tokens.length < config.maxNewTokens) {
      const id = sample(logits);
      firstAt ??= performance.now();
      if (this.stopIds.has(id) && !config.ignoreEos) {
        finishReason = "eos";
        break;
      }
      tokens.push(id);
      const [text, hit] = stops.add(decoder.step(id));
      yield text;
      if (hit) {
        finishReason = "stop";
        break;
      }
      if (tokens.length < config.maxNewTokens) logits = await state.feed([id]);
    }
    if (finishReason !== "stop") yield stops.flush(decoder.flush());
    const end = performance.now();
    const decodeS = firstAt === null ? 0 : (end - firstAt) / 1000;
    return {
      tokens,
      finishReason,
      promptTokens: ids,
      timings: {
        timeToFirstTokenS: firstAt === null ? 0 : (firstAt - started) / 1000,
        decodeS,
        totalS: (end - started) / 1000,
        tokensPerS: tokens.length > 1 && decodeS > 0 ? (tokens.length - 1) / decodeS : 0,
        sessionS: state.sessionS,
        steps: state.steps,
      },
    };
  }
}
