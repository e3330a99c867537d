// edgegpt in the browser: run an edgegpt bundle with onnxruntime-web. The public names; see README "In the browser".
//
//   import { Generator } from "./edgegpt.js";
//   const gen = await Generator.load("/bundle/");                 // fetches and verifies every file (sha256)
//   for await (const piece of gen.stream("def main(", { maxNewTokens: 48 })) output.textContent += piece;
//   const result = await gen.generate("def main(", { temperature: 0.8, seed: 0, stop: ["\n\n"] });

export { BundleError, sha256Hex } from "./src/bundle.js";
export {
  ContextLengthError, DecodeState, Generator, autoProvider, browserProblem, ort, webgpuProblem,
} from "./src/generator.js";
export { SamplingError, samplingConfig } from "./src/sampling.js";
