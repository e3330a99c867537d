// Sampling over one row of logits: greedy, temperature, top-k, top-p, and a seeded draw.
//
// The chain's order follows runtime/generation/sampling.py (Hugging Face `generate`): temperature, top-k, top-p over the
// top-k renormalised, then a draw. Greedy is argmax with ties to the lowest id, like numpy and torch, so
// greedy tokens equal the Python runtime's. The seeded generator is written by hand (mulberry32, a few lines)
// because Math.random cannot be seeded; the same seed gives the same text here, not the same text as numpy's
// PCG64 in Python.

export class SamplingError extends Error {
  constructor(message) {
    super(message);
    this.name = "SamplingError";
  }
}

export const DEFAULTS = Object.freeze({
  maxNewTokens: 64,
  temperature: 0,
  topK: 0,
  topP: 1,
  stop: [],
  seed: null,
  ignoreEos: false,
});

/** Validated options: DEFAULTS overridden by `options`; an unknown name or a bad value throws SamplingError. */
export function samplingConfig(options = {}) {
  for (const name of Object.keys(options)) {
    if (!(name in DEFAULTS)) throw new SamplingError(`unknown sampling option ${JSON.stringify(name)}; known: ${Object.keys(DEFAULTS).join(", ")}`);
  }
  const c = { ...DEFAULTS, ...options };
  const isInt = (v) => Number.isInteger(v);
  if (!isInt(c.maxNewTokens) || c.maxNewTokens < 0) throw new SamplingError(`maxNewTokens must be an integer >= 0, got ${c.maxNewTokens}`);
  if (!(c.temperature >= 0)) throw new SamplingError(`temperature must be >= 0, got ${c.temperature}`);
  if (!isInt(c.topK) || c.topK < 0) throw new SamplingError(`topK must be an integer >= 0, got ${c.topK}`);
  if (!(c.topP > 0 && c.topP <= 1)) throw new SamplingError(`topP must be in (0, 1], got ${c.topP}`);
  if (c.seed !== null && !isInt(c.seed)) throw new SamplingError(`seed must be an integer or null, got ${c.seed}`);
  const stop = typeof c.stop === "string" ? [c.stop] : c.stop;
  if (!Array.isArray(stop) || !stop.every((s) => typeof s === "string" && s.length)) {
    throw new SamplingError(`stop must be non-empty strings, got ${JSON.stringify(c.stop)}`);
  }
  return Object.freeze({ ...c, stop: Object.freeze([...stop]) });
}

/** mulberry32: a 32-bit seeded generator of floats in [0, 1). */
export function seededRandom(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Index of the largest value of `row[0..n)`, ties to the lowest index. */
export function argmax(row, n = row.length) {
  let best = 0;
  for (let i = 1; i < n; i++) if (row[i] > row[best]) best = i;
  return best;
}

/**
 * A sampler for one request: `sampler(logits)` -> a token id in 0..sampledVocab-1.
 * @param {object} config from samplingConfig
 * @param {number} sampledVocab ids from this on (a padded vocabulary) are never picked
 */
export function makeSampler(config, sampledVocab) {
  if (config.temperature === 0) return (row) => argmax(row, sampledVocab);
  const random = seededRandom(config.seed ?? Math.floor(Math.random() * 2 ** 32));
  return (row) => {
    let ids = Array.from({ length: sampledVocab }, (_, i) => i);
    const scaled = Float64Array.from(ids, (i) => row[i] / config.temperature);
    ids.sort((a, b) => scaled[b] - scaled[a] || a - b); // most likely first
    if (config.topK > 0) ids = ids.slice(0, config.topK);
    const top = scaled[ids[0]];
    let probs = ids.map((i) => Math.exp(scaled[i] - top));
    let total = probs.reduce((s, p) => s + p, 0);
    if (config.topP < 1) {
      let kept = 0;
      let mass = 0;
      while (kept < ids.length && mass < config.topP * total) mass += probs[kept++]; // the smallest set reaching top_p
      ids = ids.slice(0, kept);
      probs = probs.slice(0, kept);
      total = mass;
    }
    let r = random() * total;
    for (let k = 0; k < ids.length; k++) {
      r -= probs[k];
      if (r < 0) return ids[k];
    }
    return ids[ids.length - 1];
  };
}
