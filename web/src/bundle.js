// Fetch an edgegpt bundle over HTTP and verify every file it uses against manifest.json before use.
//
// The browser's side of edgegpt/manifest.py `verify_bundle`: the manifest's format and version, then, for
// each file the runtime reads (the graph, its external data, tokenizer.json), its size and sha256 through
// WebCrypto (crypto.subtle.digest). A file that differs is refused with an error naming it; nothing reaches
// onnxruntime-web before all of them pass.

export const FORMAT_NAME = "edgegpt-bundle";
export const FORMAT_VERSION = 1;

export class BundleError extends Error {
  constructor(message) {
    super(message);
    this.name = "BundleError";
  }
}

/** Hex sha256 of bytes, by WebCrypto. */
export async function sha256Hex(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

function memberUrl(base, name) {
  if (!name || name.startsWith("/") || name.split("/").includes("..") || /^[a-z]+:/i.test(name)) {
    throw new BundleError(`${base}: file name ${JSON.stringify(name)} must be a relative path inside the bundle`);
  }
  return new URL(name, base);
}

async function fetchBytes(fetchFn, url) {
  let response;
  try {
    response = await fetchFn(url);
  } catch (error) {
    throw new BundleError(`${url}: cannot be fetched (${error.message})`);
  }
  if (!response.ok) throw new BundleError(`${url}: HTTP ${response.status}; is the bundle served there?`);
  return new Uint8Array(await response.arrayBuffer());
}

/** The bundle's manifest.json, its header checked (format and version); files are not hashed here. */
export async function readManifest(base, fetchFn = fetch) {
  const url = new URL("manifest.json", base);
  let manifest;
  try {
    manifest = JSON.parse(new TextDecoder().decode(await fetchBytes(fetchFn, url)));
  } catch (error) {
    if (error instanceof BundleError) throw error;
    throw new BundleError(`${url}: unreadable manifest (${error.message}); re-export the bundle`);
  }
  if (manifest?.format !== FORMAT_NAME) throw new BundleError(`${url}: not an ${FORMAT_NAME} manifest`);
  if (manifest.format_version !== FORMAT_VERSION) {
    throw new BundleError(`${url}: format_version ${manifest.format_version}, this runtime reads ${FORMAT_VERSION}; upgrade or re-export`);
  }
  if (typeof manifest.files !== "object" || manifest.files === null) throw new BundleError(`${url}: no 'files' section`);
  return manifest;
}

/**
 * Fetch one listed file and check its size and sha256 against the manifest.
 * @returns {Promise<Uint8Array>} the file's bytes
 * @throws {BundleError} the file is not listed, missing, resized or altered
 */
export async function fetchVerified(base, manifest, name, fetchFn = fetch) {
  const meta = manifest.files[name];
  if (!meta) throw new BundleError(`${base}: ${name} is not listed (hashed) in manifest.json; re-export the bundle`);
  const url = memberUrl(base, name);
  const bytes = await fetchBytes(fetchFn, url);
  if (bytes.length !== meta.size) {
    throw new BundleError(`${url}: ${bytes.length} bytes, the manifest says ${meta.size}; the file is truncated or replaced`);
  }
  if ((await sha256Hex(bytes)) !== meta.sha256) {
    throw new BundleError(`${url}: sha256 differs from the manifest; the file was modified or corrupted, refusing to load it`);
  }
  return bytes;
}

/**
 * The graph file the browser runs: the manifest's ONNX graph when listed, else its ORT-format file.
 * @returns {{file: string, externalData: string|null}}
 */
export function graphFile(manifest) {
  const graph = manifest.graph ?? {};
  if (graph.file && manifest.files[graph.file]) return { file: graph.file, externalData: graph.external_data ?? null };
  const ort = manifest.ort;
  if (ort?.file && manifest.files[ort.file]) return { file: ort.file, externalData: null };
  throw new BundleError("manifest.json lists neither an ONNX graph nor an ORT-format file; re-export the bundle");
}
