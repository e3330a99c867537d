import assert from "node:assert/strict";
import { test } from "node:test";

import { BundleError, fetchVerified, graphFile, readManifest, sha256Hex } from "../src/bundle.js";

const utf8 = new TextEncoder();

// An in-memory "server": URL path -> bytes.
function server(files) {
  return async (url) => {
    const body = files[new URL(url).pathname];
    return body === undefined ? new Response("", { status: 404 }) : new Response(body);
  };
}

async function bundle() {
  const tokenizer = utf8.encode('{"model": {}}');
  return {
    "/b/manifest.json": JSON.stringify({
      format: "edgegpt-bundle",
      format_version: 1,
      graph: { file: "model.onnx" },
      files: { "tokenizer.json": { size: tokenizer.length, sha256: await sha256Hex(tokenizer) }, "model.onnx": { size: 3, sha256: "0" } },
    }),
    "/b/tokenizer.json": tokenizer,
  };
}

test("sha256Hex is the standard digest", async () => {
  assert.equal(await sha256Hex(utf8.encode("abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
});

test("a listed file that matches is returned; altered, resized or unlisted ones are refused", async () => {
  const files = await bundle();
  const base = "http://x/b/";
  const manifest = await readManifest(base, server(files));
  assert.deepEqual(await fetchVerified(base, manifest, "tokenizer.json", server(files)), files["/b/tokenizer.json"]);
  const altered = { ...files, "/b/tokenizer.json": utf8.encode('{"model": []}') };
  await assert.rejects(fetchVerified(base, manifest, "tokenizer.json", server(altered)), /tokenizer.json: sha256 differs from the manifest/);
  const longer = { ...files, "/b/tokenizer.json": utf8.encode('{"model": {} }') };
  await assert.rejects(fetchVerified(base, manifest, "tokenizer.json", server(longer)), /bytes, the manifest says/);
  await assert.rejects(fetchVerified(base, manifest, "extra.bin", server(files)), /not listed/);
  await assert.rejects(fetchVerified(base, manifest, "model.onnx", server(files)), /HTTP 404/);
});

test("unsafe names and foreign manifests are refused", async () => {
  const files = await bundle();
  const manifest = await readManifest("http://x/b/", server(files));
  manifest.files["../up"] = { size: 0, sha256: "" };
  await assert.rejects(fetchVerified("http://x/b/", manifest, "../up", server(files)), BundleError);
  const other = { "/b/manifest.json": JSON.stringify({ format: "other" }) };
  await assert.rejects(readManifest("http://x/b/", server(other)), /not an edgegpt-bundle manifest/);
  const newer = { "/b/manifest.json": JSON.stringify({ format: "edgegpt-bundle", format_version: 2, files: {} }) };
  await assert.rejects(readManifest("http://x/b/", server(newer)), /format_version 2/);
});

test("graphFile prefers the ONNX graph and falls back to the ORT-format file", () => {
  const files = { "model.onnx": {}, "model.ort": {} };
  assert.equal(graphFile({ graph: { file: "model.onnx" }, ort: { file: "model.ort" }, files }).file, "model.onnx");
  assert.equal(graphFile({ graph: { file: null }, ort: { file: "model.ort" }, files: { "model.ort": {} } }).file, "model.ort");
  assert.throws(() => graphFile({ graph: {}, files: {} }), BundleError);
});
