// Independent HC1 verifier in Node.js, used by dccsign's tests (tests/independent.py).
// It shares no code with dccsign: Node's built-in crypto, zlib and X509Certificate, plus the
// npm package cbor-x for CBOR decoding. Base45 and the Sig_structure encoding are written here.
//
// Input (stdin): one JSON object per line, {"hc1": "HC1:...", "dsc": "<base64 DER of the DSC>"}.
// Output (stdout): one JSON object per input line, in order:
//   {"ok": bool, "reason": str, "kid": hex|null, "alg": int|null, "payload": {...}|null}
// payload is the CWT claims map, set only once the signature verified. Maps become JSON
// objects whose keys are the decimal text of integer labels; byte strings become hex;
// integers beyond 2^53 are written as exact JSON numbers; tags become {"tag": n, "value": v}.
//
// The rules and their order match tests/independent.py (see its docstring); the first rule
// that fails gives the reason.

import { createHash, constants, verify as cryptoVerify, X509Certificate } from 'node:crypto';
import { createInterface } from 'node:readline';
import zlib from 'node:zlib';
import { Decoder, Tag } from 'cbor-x';

const PREFIX = 'HC1:';
const ALG_ES256 = -7;
const ALG_PS256 = -37;
const ALG_NAMES = new Map([[ALG_ES256, 'ES256'], [ALG_PS256, 'PS256']]);
const MAX_INFLATED = 4 * 1024 * 1024;
const TAG_COSE_SIGN1 = 18;
const TAG_CWT = 61;

const B45_ALPHABET = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:';
const B45_VALUE = new Map([...B45_ALPHABET].map((ch, i) => [ch, i]));

// mapsAsObjects: false keeps integer keys as integers (a JS object would turn 1 into "1").
const cbor = new Decoder({ mapsAsObjects: false, useRecords: false });

class Reject extends Error {}

function b45decode(text) {
  for (let i = 0; i < text.length; i++) {
    if (!B45_VALUE.has(text[i])) {
      throw new Reject(`base45: invalid character ${JSON.stringify(text[i])} at offset ${i}`);
    }
  }
  if (text.length % 3 === 1) throw new Reject(`base45: length ${text.length} is 1 (mod 3)`);
  const out = [];
  for (let start = 0; start < text.length; start += 3) {
    const chunk = text.slice(start, start + 3);
    const digits = [...chunk].map((ch) => B45_VALUE.get(ch));
    if (digits.length === 3) {
      const n = digits[0] + 45 * digits[1] + 2025 * digits[2];
      if (n > 0xffff) throw new Reject(`base45: triplet ${JSON.stringify(chunk)} at offset ${start} exceeds 65535`);
      out.push(n >> 8, n & 0xff);
    } else {
      const n = digits[0] + 45 * digits[1];
      if (n > 0xff) throw new Reject(`base45: final pair ${JSON.stringify(chunk)} exceeds 255`);
      out.push(n);
    }
  }
  return Buffer.from(out);
}

function inflate(data) {
  let result;
  try {
    result = zlib.inflateSync(data, { info: true, maxOutputLength: MAX_INFLATED });
  } catch (err) {
    if (err instanceof RangeError) throw new Reject(`zlib: inflated size exceeds ${MAX_INFLATED} bytes`);
    throw new Reject(`zlib: ${err.message}`);
  }
  // bytesWritten counts the input the engine consumed; it stops at the end of the stream.
  const trailing = data.length - result.engine.bytesWritten;
  if (trailing > 0) throw new Reject(`zlib: ${trailing} trailing bytes after the stream`);
  if (data[0] !== 0x78) {
    const cmf = data[0].toString(16).padStart(2, '0');
    throw new Reject(`zlib: CMF byte is 0x${cmf}, not 0x78 (deflate, 32 KiB window)`);
  }
  return result.buffer;
}

function cborOne(bytes, what) {
  try {
    return cbor.decode(bytes);
  } catch (err) {
    // cbor-x refuses data after the first item with this message (decode.js, checkedRead).
    if (err.message === 'Data read, but end of buffer not reached') {
      throw new Reject(`${what}: trailing bytes after the CBOR item`);
    }
    throw new Reject(`${what}: not valid CBOR (${err.message})`);
  }
}

const isBytes = (v) => v instanceof Uint8Array;
const isInt = (v) => (typeof v === 'number' && Number.isInteger(v)) || typeof v === 'bigint';

function header(label, prot, unprot) {
  return prot.has(label) ? prot.get(label) : unprot.get(label);
}

function unwrapCose(item) {
  if (item instanceof Tag) {
    if (item.tag === TAG_CWT) {
      item = item.value;
      if (!(item instanceof Tag && item.tag === TAG_COSE_SIGN1)) {
        throw new Reject('cose: CWT tag 61 does not wrap a COSE_Sign1 (tag 18)');
      }
    }
    if (item.tag !== TAG_COSE_SIGN1) {
      throw new Reject(`cose: unexpected CBOR tag ${item.tag} (want 18, 61(18) or none)`);
    }
    item = item.value;
  }
  if (!Array.isArray(item) || item.length !== 4) throw new Reject('cose: not a COSE_Sign1 array of four elements');
  return item;
}

// CBOR head for major type `major` and length/value `n` (shortest form).
function head(major, n) {
  const m = major << 5;
  if (n < 24) return Buffer.from([m | n]);
  if (n < 0x100) return Buffer.from([m | 24, n]);
  if (n < 0x10000) return Buffer.from([m | 25, n >> 8, n & 0xff]);
  const b = Buffer.alloc(5);
  b[0] = m | 26;
  b.writeUInt32BE(n, 1);
  return b;
}

function sigStructure(protectedBytes, payload) {
  const context = Buffer.from('Signature1', 'ascii');
  return Buffer.concat([
    head(4, 4),
    head(3, context.length), context,
    head(2, protectedBytes.length), protectedBytes,
    head(2, 0), // external_aad = h''
    head(2, payload.length), payload,
  ]);
}

const dscCache = new Map();

function loadDsc(b64) {
  let entry = dscCache.get(b64);
  if (entry === undefined) {
    try {
      const der = Buffer.from(b64, 'base64');
      const cert = new X509Certificate(der);
      entry = { kid: createHash('sha256').update(der).digest().subarray(0, 8), key: cert.publicKey };
    } catch (err) {
      entry = { error: `dsc: cannot parse the certificate (${err.message})` };
    }
    if (dscCache.size > 256) dscCache.clear();
    dscCache.set(b64, entry);
  }
  if (entry.error) throw new Reject(entry.error);
  return entry;
}

function keyDesc(key) {
  const d = key.asymmetricKeyDetails || {};
  if (key.asymmetricKeyType === 'ec') return `EC ${d.namedCurve}`;
  if (key.asymmetricKeyType.startsWith('rsa')) return `RSA-${d.modulusLength}`;
  return key.asymmetricKeyType;
}

function checkKeyFitsAlg(alg, key) {
  const type = key.asymmetricKeyType;
  if (alg === ALG_ES256) {
    if (type !== 'ec') throw new Reject(`alg: ES256 (-7) but the DSC key is ${keyDesc(key)}`);
    if (key.asymmetricKeyDetails.namedCurve !== 'prime256v1') {
      throw new Reject(`alg: ES256 (-7) needs P-256, the DSC key is ${keyDesc(key)}`);
    }
  } else if (type !== 'rsa' && type !== 'rsa-pss') {
    throw new Reject(`alg: PS256 (-37) but the DSC key is ${keyDesc(key)}`);
  }
}

function checkCwt(claims, payloadBytes) {
  if (!(claims instanceof Map)) throw new Reject(`cwt: payload is ${cborKind(claims)}, not a map`);
  for (const key of claims.keys()) {
    if (!isInt(key)) throw new Reject(`cwt: claim key ${String(key)} is not an integer`);
  }
  for (const [label, name] of [[1, 'iss'], [4, 'exp'], [6, 'iat']]) {
    if (!claims.has(label)) throw new Reject(`cwt: claim ${label} (${name}) missing`);
  }
  if (typeof claims.get(1) !== 'string') throw new Reject('cwt: claim 1 (iss) is not a text string');
  const majors = topLevelMajorTypes(payloadBytes);
  for (const [label, name] of [[4, 'exp'], [6, 'iat']]) {
    const major = majors.get(label);
    if (!isInt(claims.get(label)) || (major !== 0 && major !== 1)) {
      throw new Reject(`cwt: claim ${label} (${name}) is not an integer`);
    }
  }
  if (!claims.has(-260)) throw new Reject('cwt: claim -260 (hcert) missing');
  const hcert = claims.get(-260);
  if (!(hcert instanceof Map)) throw new Reject('cwt: claim -260 (hcert) is not a map');
  const keys = [...hcert.keys()];
  if (keys.length !== 1 || keys[0] !== 1) {
    throw new Reject(`cwt: claim -260 must be {1: map}, has keys [${keys.map(String).join(', ')}]`);
  }
  if (!(hcert.get(1) instanceof Map)) throw new Reject('cwt: claim -260 key 1 (eu_dcc_v1) is not a map');
}

// The CBOR kind of a decoded value, worded as tests/independent.py words it.
function cborKind(v) {
  if (v instanceof Map) return 'a map';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'string') return 'a text string';
  if (isBytes(v)) return 'a byte string';
  if (typeof v === 'boolean' || v === null || v === undefined) return 'a simple value';
  if (typeof v === 'bigint' || (typeof v === 'number' && Number.isInteger(v))) return 'an integer';
  if (typeof v === 'number') return 'a float';
  if (v instanceof Tag) return `tag ${v.tag}`;
  return `a tagged value (${v.constructor.name})`;
}

// Integer-valued floats (1.0) decode to the same JS number as integers (1), so integer-ness
// of exp and iat is judged from the CBOR major type of their encoded values.
function topLevelMajorTypes(bytes) {
  const majors = new Map();
  let pos = 0;
  const argument = () => {
    const ai = bytes[pos] & 31;
    pos += 1;
    if (ai < 24) return ai;
    if (ai === 31) return -1; // indefinite length (or break)
    const size = { 24: 1, 25: 2, 26: 4, 27: 8 }[ai];
    if (size === undefined || pos + size > bytes.length) throw new Reject('cwt: malformed CBOR head');
    let n = 0;
    for (let i = 0; i < size; i++) n = n * 256 + bytes[pos + i];
    pos += size;
    return n;
  };
  const skip = () => {
    if (pos >= bytes.length) throw new Reject('cwt: malformed CBOR item');
    const major = bytes[pos] >> 5;
    const n = argument();
    if (major === 2 || major === 3) {
      if (n >= 0) pos += n;
      else while (bytes[pos] !== 0xff) skip();
      if (n < 0) pos += 1;
    } else if (major === 4 || major === 5) {
      const items = major === 5 ? 2 * n : n;
      if (n >= 0) for (let i = 0; i < items; i++) skip();
      else {
        while (bytes[pos] !== 0xff) skip();
        pos += 1;
      }
    } else if (major === 6) {
      skip();
    }
  };
  if (bytes.length === 0 || bytes[0] >> 5 !== 5) return majors;
  const count = argument();
  for (let i = 0; count < 0 ? bytes[pos] !== 0xff : i < count; i++) {
    const keyStart = pos;
    skip();
    const key = cbor.decode(bytes.subarray(keyStart, pos));
    majors.set(key, bytes[pos] >> 5);
    skip();
  }
  return majors;
}

function verifyOne(hc1, dscB64, state) {
  if (typeof hc1 !== 'string') throw new Reject('input: hc1 is not a string');
  if (typeof dscB64 !== 'string') throw new Reject('input: dsc is not base64 text');
  if (!hc1.startsWith(PREFIX)) {
    throw new Reject(`prefix: does not start with 'HC1:' (starts ${JSON.stringify(hc1.slice(0, 4))})`);
  }
  const compressed = b45decode(hc1.slice(PREFIX.length));
  if (compressed.length === 0) throw new Reject('base45: empty');
  const coseBytes = inflate(compressed);

  const [protectedBytes, unprot, payloadBytes, signature] = unwrapCose(cborOne(coseBytes, 'cose'));
  if (!isBytes(protectedBytes)) throw new Reject('cose: protected header is not a byte string');
  if (!(unprot instanceof Map)) throw new Reject('cose: unprotected header is not a map');
  if (!isBytes(payloadBytes)) throw new Reject('cose: payload is not a byte string (detached or wrong type)');
  if (!isBytes(signature)) throw new Reject('cose: signature is not a byte string');
  let prot = new Map();
  if (protectedBytes.length > 0) {
    prot = cborOne(protectedBytes, 'cose: protected header');
    if (!(prot instanceof Map)) throw new Reject('cose: protected header does not hold a map');
  }
  if (prot.has(2) || unprot.has(2)) {
    throw new Reject('cose: crit header (2) present; no critical extensions are supported');
  }

  const alg = header(1, prot, unprot);
  const kid = header(4, prot, unprot);
  if (typeof alg === 'number' && Number.isInteger(alg)) state.alg = alg;
  if (isBytes(kid)) state.kid = Buffer.from(kid).toString('hex');
  if (alg === undefined) throw new Reject('alg: missing from both headers');
  if (!ALG_NAMES.has(alg)) throw new Reject(`alg: ${render(alg)} is not ES256 (-7) or PS256 (-37)`);
  if (kid === undefined) throw new Reject('kid: missing from both headers');
  if (!isBytes(kid)) throw new Reject(`kid: is ${cborKind(kid)}, not a byte string`);

  const dsc = loadDsc(dscB64);
  if (Buffer.compare(Buffer.from(kid), dsc.kid) !== 0) {
    throw new Reject(`kid: ${state.kid} does not match the DSC (SHA-256[:8] = ${dsc.kid.toString('hex')})`);
  }
  checkKeyFitsAlg(alg, dsc.key);
  if (alg === ALG_ES256 && signature.length !== 64) {
    throw new Reject(`signature: ES256 needs 64 bytes r||s, got ${signature.length}`);
  }

  const data = sigStructure(protectedBytes, payloadBytes);
  const keyOptions = alg === ALG_ES256
    ? { key: dsc.key, dsaEncoding: 'ieee-p1363' }
    : { key: dsc.key, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 };
  let good;
  try {
    good = cryptoVerify('sha256', data, keyOptions, signature);
  } catch (err) {
    throw new Reject(`signature: ${ALG_NAMES.get(alg)} verification error (${err.message})`);
  }
  if (!good) throw new Reject(`signature: ${ALG_NAMES.get(alg)} signature does not verify with the DSC key`);

  const claims = cborOne(payloadBytes, 'cwt');
  checkCwt(claims, payloadBytes);
  return claims;
}

// ---------------------------------------------------------------- JSON rendering of CBOR values

function render(v) {
  if (v === null || v === undefined) return 'null';
  if (typeof v === 'bigint') return v.toString();
  if (typeof v === 'number') return Number.isFinite(v) ? JSON.stringify(v) : JSON.stringify(String(v));
  if (typeof v === 'string' || typeof v === 'boolean') return JSON.stringify(v);
  if (isBytes(v)) return JSON.stringify(Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString('hex'));
  if (v instanceof Date) return JSON.stringify(Number.isNaN(v.getTime()) ? 'Invalid Date' : v.toISOString());
  if (v instanceof Tag) return `{"tag":${v.tag},"value":${render(v.value)}}`;
  if (Array.isArray(v) || v instanceof Set) return `[${[...v].map(render).join(',')}]`;
  if (v instanceof Map) {
    return `{${[...v].map(([k, val]) => `${JSON.stringify(String(k))}:${render(val)}`).join(',')}}`;
  }
  if (typeof v === 'object') {
    return `{${Object.entries(v).map(([k, val]) => `${JSON.stringify(k)}:${render(val)}`).join(',')}}`;
  }
  return JSON.stringify(String(v));
}

function handleLine(line) {
  const state = { kid: null, alg: null };
  let ok = false;
  let reason;
  let payload = 'null';
  try {
    let input;
    try {
      input = JSON.parse(line);
    } catch (err) {
      throw new Reject(`input: not JSON (${err.message})`);
    }
    if (input === null || typeof input !== 'object') throw new Reject('input: not a JSON object');
    const claims = verifyOne(input.hc1, input.dsc, state);
    payload = render(claims);
    ok = true;
    reason = 'ok';
  } catch (err) {
    reason = err instanceof Reject ? err.message : `internal: ${err && err.stack ? err.stack.split('\n')[0] : err}`;
  }
  return `{"ok":${ok},"reason":${JSON.stringify(reason)},"kid":${render(state.kid)},` +
    `"alg":${render(state.alg)},"payload":${payload}}`;
}

const out = [];
const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of rl) {
  if (line.trim() === '') continue;
  out.push(handleLine(line));
  if (out.length >= 1024) {
    process.stdout.write(out.join('\n') + '\n');
    out.length = 0;
  }
}
if (out.length) process.stdout.write(out.join('\n') + '\n');
