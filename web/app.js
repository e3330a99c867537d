// The page of `edgegpt web`: load the bundle served at /bundle/, then stream what a prompt generates.
// URL parameters: ?provider=wasm|webgpu|auto (default auto), ?threads=N (default 2 when cross-origin isolated),
// ?ignore-eos (keep generating past the end-of-text token: benchmarks).
// For automation, window.edgegpt holds {ready, generator, error}, and #output's data-tokens the last token ids.

import { Generator, ort } from "./edgegpt.js";
import { tokenBudget } from "./src/budget.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const isolated = globalThis.crossOriginIsolated === true; // SharedArrayBuffer: WebAssembly threads
const threads = isolated ? Number(params.get("threads") ?? Math.min(2, navigator.hardwareConcurrency || 1)) : 1;
ort.env.wasm.wasmPaths = "/ort/";

async function load() {
  try {
    const generator = await Generator.load("/bundle/", { provider: params.get("provider") ?? "auto", threads });
    window.edgegpt.generator = generator;
    const c = generator.config;
    $("status").textContent = `${generator.modelFile}: ${c.n_layer} layers × ${c.n_embd}, context ${c.block_size}; ` +
      `${generator.provider}, ${generator.provider === "wasm" ? `${threads} thread(s), ` : ""}` +
      `cross-origin isolated: ${isolated ? "yes" : "no"}`;
    $("generate").disabled = false;
    return generator;
  } catch (error) {
    window.edgegpt.error = error.message;
    $("status").textContent = `Refused: ${error.message}`;
    $("status").className = "error";
    throw error;
  }
}

function options(generator) {
  const stop = $("stop").value.replaceAll("\\n", "\n").replaceAll("\\t", "\t");
  const field = $("max-new-tokens");
  let maxNewTokens = Number(field.value);
  if (!field.dataset.edited) {
    // The default (64) lowered to the room the prompt leaves, as the CLI's -n default is: a small model's context
    // may be shorter. A number the user typed is kept, and refused if it does not fit.
    const promptTokens = Math.max(generator.encode($("prompt").value).length, 1);
    maxNewTokens = tokenBudget(promptTokens, maxNewTokens, generator.config.block_size, { fit: true });
  }
  return {
    maxNewTokens,
    temperature: Number($("temperature").value),
    topK: Number($("top-k").value),
    topP: Number($("top-p").value),
    seed: Number($("seed").value),
    stop: stop ? [stop] : [],
    ignoreEos: params.has("ignore-eos"),
  };
}

// A decode step's promise settles without giving the browser a turn, so a loop of steps would block the page
// (no painting, no clicks) until the end: hand it a macrotask turn after each piece. MessageChannel, unlike
// setTimeout, has no 4 ms clamp.
function yieldToBrowser() {
  return new Promise((resolve) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = () => resolve();
    channel.port2.postMessage(null);
  });
}

async function generate() {
  const generator = window.edgegpt.generator;
  $("generate").disabled = true;
  $("output").textContent = "";
  delete $("stats").dataset.done;
  $("stats").textContent = "";
  try {
    const stream = generator.stream($("prompt").value, options(generator));
    let step;
    while (!(step = await stream.next()).done) {
      $("output").textContent += step.value;
      await yieldToBrowser();
    }
    const { tokens, finishReason, timings } = step.value;
    $("output").dataset.tokens = JSON.stringify(tokens);
    $("stats").textContent = `${tokens.length} tokens, ${timings.tokensPerS.toFixed(1)} tokens/s, ` +
      `first token ${(timings.timeToFirstTokenS * 1000).toFixed(0)} ms, finish: ${finishReason}`;
    $("stats").dataset.tokensPerS = timings.tokensPerS;
  } catch (error) {
    $("stats").textContent = `Error: ${error.message}`;
  } finally {
    $("stats").dataset.done = "1";
    $("generate").disabled = false;
  }
}

window.edgegpt = { generator: null, error: null, threads, isolated };
window.edgegpt.ready = load();
$("generate").addEventListener("click", generate);
$("max-new-tokens").addEventListener("input", () => ($("max-new-tokens").dataset.edited = "1"));
