// Drive the `edgegpt web` page in the system's headless Chromium (no browser download) with playwright-core.
//
//   node web/scripts/browser.mjs URL [--prompt TEXT] [--max-new-tokens N] [--repeat R] [--swiftshader]
//
// --swiftshader gives the browser WebGPU on the CPU (SwiftShader's Vulkan, shipped with Chromium): slow, but it
// runs the page's WebGPU path on a machine without a GPU (open the page with ?provider=webgpu).
// Types the prompt, clicks Generate R times (greedy), and prints one JSON line: the status line, whether the page
// was cross-origin isolated and its WebAssembly threads, the load error (a refused bundle) or each run's tokens,
// text and decode tokens/s. The browser: $CHROMIUM, else Debian's chromium (apt-get install chromium).

import { existsSync } from "node:fs";
import { parseArgs } from "node:util";

import { chromium } from "playwright-core";

const { positionals, values } = parseArgs({
  allowPositionals: true,
  options: {
    prompt: { type: "string", default: "def main(" },
    "max-new-tokens": { type: "string", default: "32" },
    repeat: { type: "string", default: "1" },
    timeout: { type: "string", default: "300000" },
    swiftshader: { type: "boolean", default: false },
  },
});
const url = positionals[0];
const executablePath = process.env.CHROMIUM ?? ["/usr/lib/chromium/chromium", "/usr/bin/chromium"].find(existsSync);
if (!url || !executablePath) {
  console.error(url ? "no Chromium found: apt-get install -y chromium, or set CHROMIUM" : "usage: browser.mjs URL [...]");
  process.exit(2);
}
const timeout = Number(values.timeout);
// --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
const webgpu = ["--enable-unsafe-webgpu", "--enable-features=Vulkan", "--use-vulkan=swiftshader", "--use-webgpu-adapter=swiftshader",
  "--disable-vulkan-surface"];
const args = ["--no-sandbox", ...(values.swiftshader ? webgpu : [])];
const browser = await chromium.launch({ executablePath, headless: true, args });
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(timeout);
  const console_ = [];
  page.on("console", (message) => console_.push(message.text()));
  page.on("pageerror", (error) => console_.push(String(error)));
  await page.goto(url);
  const loaded = await page.evaluate(() => window.edgegpt.ready.then(() => null, (error) => error.message));
  const info = await page.evaluate(() => ({ isolated: window.edgegpt.isolated, threads: window.edgegpt.threads }));
  const result = { status: await page.textContent("#status"), ...info, error: loaded, runs: [], console: console_ };
  if (loaded === null) {
    await page.fill("#prompt", values.prompt);
    await page.fill("#max-new-tokens", values["max-new-tokens"]);
    for (let i = 0; i < Number(values.repeat); i++) {
      await page.click("#generate");
      await page.waitForSelector("#stats[data-done]", { timeout });
      result.runs.push(
        await page.evaluate(() => ({
          tokens: JSON.parse(document.querySelector("#output").dataset.tokens ?? "null"),
          text: document.querySelector("#output").textContent,
          stats: document.querySelector("#stats").textContent,
          tokensPerS: Number(document.querySelector("#stats").dataset.tokensPerS),
        })),
      );
    }
  }
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
