// Text pieces of a stream: token ids -> text that never splits a character, and stop strings.
//
// Mirrors edgegpt/tokenizer.py `IncrementalDecoder` and runtime/generation/completion.py `StopText`. The id -> bytes table
// is built from tokenizer.json by hand because no maintained JS tokenizer exposes a token's raw bytes: a
// byte-level BPE token can end mid-character (an emoji is often two tokens), so decoding ids one at a time
// with the tokenizer would emit U+FFFD halves. The bytes then go through the platform's TextDecoder in
// streaming mode, which holds back an incomplete character (and replaces invalid bytes with U+FFFD, as
// Python's errors="replace" does).

/** GPT-2's byte <-> printable-character map (the byte-level pre-tokenizer's alphabet): char -> byte. */
export function unicodeToByte() {
  const bytes = [];
  for (let b = 0x21; b <= 0x7e; b++) bytes.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bytes.push(b);
  for (let b = 0xae; b <= 0xff; b++) bytes.push(b);
  const chars = [...bytes];
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bytes.includes(b)) {
      bytes.push(b);
      chars.push(256 + n++);
    }
  }
  return new Map(chars.map((c, i) => [String.fromCodePoint(c), bytes[i]]));
}

/**
 * The raw bytes of every token id of a byte-level BPE tokenizer.json (special tokens: their UTF-8 text).
 * @param {object} tokenizerJson the parsed tokenizer.json
 * @returns {Uint8Array[]} indexed by id
 */
export function tokenBytes(tokenizerJson) {
  const u2b = unicodeToByte();
  const table = [];
  const utf8 = new TextEncoder();
  for (const [token, id] of Object.entries(tokenizerJson.model.vocab)) {
    const chars = [...token];
    if (!chars.every((c) => u2b.has(c))) {
      throw new Error(`token ${JSON.stringify(token)} (id ${id}) is not byte-level BPE; train the tokenizer with edgegpt`);
    }
    table[id] = Uint8Array.from(chars, (c) => u2b.get(c));
  }
  for (const added of tokenizerJson.added_tokens ?? []) table[added.id] = utf8.encode(added.content);
  const missing = [...table.keys()].filter((i) => table[i] === undefined);
  if (missing.length) throw new Error(`tokenizer.json has no token for id(s) ${missing.slice(0, 5)}`);
  return table;
}

/** Token ids in, one at a time -> text pieces that never split a UTF-8 character; `flush()` ends the stream. */
export class IncrementalDecoder {
  constructor(bytesTable) {
    this.bytes = bytesTable;
    this.utf8 = new TextDecoder("utf-8");
  }

  step(id) {
    const piece = this.bytes[id];
    if (piece === undefined) throw new RangeError(`token id ${id} is outside the vocabulary (0..${this.bytes.length - 1})`);
    return this.utf8.decode(piece, { stream: true });
  }

  flush() {
    return this.utf8.decode();
  }
}

/** Holds back text that may be the start of a stop string; cuts the text at the first stop string. */
export class StopText {
  constructor(stops) {
    this.stops = stops;
    this.pending = "";
  }

  /** -> [text safe to emit, whether a stop string was hit] */
  add(piece) {
    if (!this.stops.length) return [piece, false];
    const text = this.pending + piece;
    const hits = this.stops.map((s) => text.indexOf(s)).filter((i) => i >= 0);
    if (hits.length) {
      this.pending = "";
      return [text.slice(0, Math.min(...hits)), true];
    }
    let hold = 0; // the longest tail of text that a stop string starts with
    for (const stop of this.stops) {
      for (let k = Math.min(stop.length - 1, text.length); k > hold; k--) {
        if (text.endsWith(stop.slice(0, k))) {
          hold = k;
          break;
        }
      }
    }
    this.pending = text.slice(text.length - hold);
    return [text.slice(0, text.length - hold), false];
  }

  flush(piece) {
    const [out, hit] = this.add(piece);
    const rest = hit ? "" : this.pending;
    this.pending = "";
    return out + rest;
  }
}
