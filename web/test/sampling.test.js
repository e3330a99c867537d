import assert from "node:assert/strict";
import { test } from "node:test";

import { argmax, makeSampler, SamplingError, samplingConfig, seededRandom } from "../src/sampling.js";

test("greedy is argmax, ties to the lowest id, never a padded id", () => {
  const sample = makeSampler(samplingConfig(), 4);
  assert.equal(sample(Float32Array.from([0, 3, 3, 1, 9])), 1);
  assert.equal(argmax([2, 5, 5]), 1);
});

test("the same seed gives the same draws; another seed others", () => {
  const row = Float32Array.from({ length: 50 }, (_, i) => Math.sin(i));
  const config = samplingConfig({ temperature: 1.5, seed: 7 });
  const draws = (c) => {
    const sample = makeSampler(c, 50);
    return Array.from({ length: 40 }, () => sample(row));
  };
  assert.deepEqual(draws(config), draws(config));
  assert.notDeepEqual(draws(config), draws(samplingConfig({ temperature: 1.5, seed: 8 })));
  assert.ok(new Set(draws(config)).size > 3);
});

test("top-k keeps the k most likely ids", () => {
  const row = Float32Array.from([0, 5, 1, 4, 2]);
  const sample = makeSampler(samplingConfig({ temperature: 10, topK: 2, seed: 1 }), 5);
  const seen = new Set(Array.from({ length: 200 }, () => sample(row)));
  assert.deepEqual([...seen].sort(), [1, 3]);
});

test("top-p keeps the smallest set reaching p", () => {
  const row = Float32Array.from([Math.log(0.6), Math.log(0.3), Math.log(0.1)]);
  const sample = makeSampler(samplingConfig({ temperature: 1, topP: 0.8, seed: 3 }), 3);
  const seen = new Set(Array.from({ length: 300 }, () => sample(row)));
  assert.deepEqual([...seen].sort(), [0, 1]);
});

test("bad options are refused, naming them", () => {
  assert.throws(() => samplingConfig({ topk: 3 }), SamplingError);
  assert.throws(() => samplingConfig({ topP: 0 }), /topP must be in \(0, 1\]/);
  assert.throws(() => samplingConfig({ stop: [""] }), /stop must be non-empty strings/);
  assert.throws(() => samplingConfig({ maxNewTokens: -1 }), /maxNewTokens/);
});

test("seededRandom stays in [0, 1)", () => {
  const random = seededRandom(0);
  for (let i = 0; i < 1000; i++) {
    const r = random();
    assert.ok(r >= 0 && r < 1);
  }
});
