#!/usr/bin/env node
// The filter's own CPU per routed request, with nothing of a gateway around it: runs a built
// market_router.wasm under V8 (Node) behind a minimal in-process proxy-wasm host (ABI 0.2.1:
// header maps, buffers, properties, shared data, metrics, local replies) and times whole
// requests in route mode: context create, request headers, request body, response headers,
// response body, log, done, delete. Compares modules built differently from the same code
// (e.g. two rustc opt-levels) call by call.
//
//   node --no-liftoff scripts/filter-bench.mjs [--body BYTES] [--samples N] [--requests N] A.wasm [B.wasm ...]
//
// --no-liftoff compiles every function with V8's optimizing compiler up front, as Envoy's V8
// does. The modules run in turn, sample by sample; the figure is each module's fastest
// sample (ns per request; other work on the machine only ever adds time), the median beside.
// The host answers like Envoy does on the healthy path: the upstream says 200 with a small
// JSON answer carrying usage.

import { readFile } from 'node:fs/promises';
import process from 'node:process';

const argv = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = argv.indexOf(name);
  if (i < 0) return dflt;
  const v = Number(argv[i + 1]);
  argv.splice(i, 2);
  return v;
};
const bodySize = opt('--body', 200);
const samples = opt('--samples', 15);
const perSample = opt('--requests', 2000);
const files = argv;
if (files.length === 0) {
  process.stderr.write('usage: node --no-liftoff scripts/filter-bench.mjs [--body BYTES] [--samples N] [--requests N] A.wasm [B.wasm ...]\n');
  process.exit(2);
}

const MODEL = 'gpt-4o-mini';
const CONFIG = JSON.stringify({
  providers: [
    { name: 'alpha', cluster: 'provider_a', models: { [MODEL]: MODEL },
      static_offer: { price: { input_per_mtok: 0.15, output_per_mtok: 0.6 }, latency_ms: { ttft_p50: 400 }, uptime: 0.995 } },
    { name: 'beta', cluster: 'provider_b', models: { [MODEL]: MODEL },
      static_offer: { price: { input_per_mtok: 0.3, output_per_mtok: 1.2 }, latency_ms: { ttft_p50: 300 }, uptime: 0.999 } },
  ],
  routing: { strategy: 'balanced' },
  failover: { mode: 'route' },
});

function chatBody(size) {
  const head = `{"model":"${MODEL}","max_tokens":64,"messages":[{"role":"user","content":"`;
  const tail = '"}]}';
  const words = 'lorem ipsum dolor sit amet consectetur adipiscing elit ';
  let content = '';
  while (content.length < size - head.length - tail.length) content += words;
  return Buffer.from(head + content.slice(0, size - head.length - tail.length) + tail);
}

const ANSWER = Buffer.from(JSON.stringify({
  id: 'chatcmpl-1', object: 'chat.completion', model: MODEL,
  choices: [{ index: 0, message: { role: 'assistant', content: 'ok' }, finish_reason: 'stop' }],
  usage: { prompt_tokens: 12, completion_tokens: 1, total_tokens: 13 },
}));

const OK = 0, NOT_FOUND = 1, BAD_ARGUMENT = 2;
// Wall-clock nanoseconds: the epoch time at start plus the monotonic clock since.
const EPOCH_NS = BigInt(Date.now()) * 1000000n;
const HR0 = process.hrtime.bigint();
// MapType: 0 request headers, 2 response headers; BufferType: 0 request body, 1 response body, 7 plugin configuration.

async function load(file) {
  const bytes = await readFile(file);
  const module = await WebAssembly.compile(bytes);
  const enc = new TextEncoder();
  const dec = new TextDecoder();
  const h = {
    maps: { 0: [], 1: [], 2: [], 3: [] },
    buffers: { 0: Buffer.alloc(0), 1: Buffer.alloc(0), 7: Buffer.from(CONFIG) },
    shared: new Map(),
    props: new Map(),
    metrics: [],
    replies: 0,
  };
  let inst;
  // Views of the module's memory, made again only when it grew.
  let buf = null, u8 = null, dv = null;
  const fresh = () => {
    if (inst.exports.memory.buffer !== buf) {
      buf = inst.exports.memory.buffer;
      u8 = new Uint8Array(buf);
      dv = new DataView(buf);
    }
  };
  const mem = () => (fresh(), u8);
  const view = () => (fresh(), dv);
  const str = (p, n) => dec.decode(mem().subarray(p, p + n));
  // Hands bytes to the module in memory it allocates, as a host does.
  const give = (data, retPtr, retSize) => {
    const n = data.length;
    const p = n === 0 ? 0 : inst.exports.proxy_on_memory_allocate(n);
    if (n) mem().set(data, p);
    view().setUint32(retPtr, p, true);
    view().setUint32(retSize, n, true);
    return OK;
  };
  // The serialized form of a map the module has not changed since (the request's own maps
  // are the same array every time until the module edits them).
  const serialized = new WeakMap();
  const serializeMap = (pairs) => {
    let out = serialized.get(pairs);
    if (!out) {
      out = serializeNew(pairs);
      serialized.set(pairs, out);
    }
    return out;
  };
  const serializeNew = (pairs) => {
    const parts = pairs.map(([k, v]) => [enc.encode(k), enc.encode(v)]);
    let size = 4 + parts.length * 8;
    for (const [k, v] of parts) size += k.length + v.length + 2;
    const out = new Uint8Array(size);
    const dv = new DataView(out.buffer);
    dv.setUint32(0, parts.length, true);
    let off = 4 + parts.length * 8;
    parts.forEach(([k, v], i) => {
      dv.setUint32(4 + i * 8, k.length, true);
      dv.setUint32(8 + i * 8, v.length, true);
      out.set(k, off); off += k.length + 1;
      out.set(v, off); off += v.length + 1;
    });
    return out;
  };
  const deserializeMap = (p, n) => {
    const dv = view();
    const count = dv.getUint32(p, true);
    let off = p + 4 + count * 8;
    const pairs = [];
    for (let i = 0; i < count; i++) {
      const kl = dv.getUint32(p + 4 + i * 8, true);
      const vl = dv.getUint32(p + 8 + i * 8, true);
      const k = str(off, kl); off += kl + 1;
      const v = str(off, vl); off += vl + 1;
      pairs.push([k, v]);
    }
    return pairs;
  };
  const env = {
    proxy_log: (level, p, n) => {
      if (level >= 3 || process.env.FILTER_BENCH_LOG) process.stderr.write(`log ${level}: ${str(p, n)}\n`);
      return OK;
    },
    proxy_get_log_level: (ret) => { view().setUint32(ret, 2, true); return OK; },
    proxy_get_current_time_nanoseconds: (ret) => {
      view().setBigUint64(ret, EPOCH_NS + (process.hrtime.bigint() - HR0), true);
      return OK;
    },
    proxy_set_tick_period_milliseconds: () => OK,
    proxy_get_buffer_bytes: (type, start, max, retPtr, retSize) => {
      const b = h.buffers[type];
      if (!b) return NOT_FOUND;
      // usize arguments arrive as signed i32 (usize::MAX as -1).
      start >>>= 0;
      max >>>= 0;
      return give(b.subarray(start, Math.min(b.length, start + max)), retPtr, retSize);
    },
    proxy_set_buffer_bytes: (type, start, size, p, n) => {
      const b = h.buffers[type] ?? Buffer.alloc(0);
      start >>>= 0;
      size >>>= 0;
      const data = Buffer.from(mem().subarray(p, p + n));
      h.buffers[type] = Buffer.concat([b.subarray(0, start), data, b.subarray(Math.min(b.length, start + size))]);
      return OK;
    },
    proxy_get_header_map_pairs: (type, retPtr, retSize) => give(serializeMap(h.maps[type] ?? []), retPtr, retSize),
    proxy_set_header_map_pairs: (type, p, n) => { h.maps[type] = deserializeMap(p, n); return OK; },
    proxy_get_header_map_value: (type, kp, kn, retPtr, retSize) => {
      const k = str(kp, kn);
      const hit = (h.maps[type] ?? []).find(([name]) => name === k);
      if (!hit) return NOT_FOUND;
      return give(enc.encode(hit[1]), retPtr, retSize);
    },
    proxy_replace_header_map_value: (type, kp, kn, vp, vn) => {
      const k = str(kp, kn), v = str(vp, vn);
      const m = (h.maps[type] = (h.maps[type] ?? []).slice());
      const i = m.findIndex(([name]) => name === k);
      if (i >= 0) m[i] = [k, v]; else m.push([k, v]);
      return OK;
    },
    proxy_add_header_map_value: (type, kp, kn, vp, vn) => {
      (h.maps[type] = (h.maps[type] ?? []).slice()).push([str(kp, kn), str(vp, vn)]);
      return OK;
    },
    proxy_remove_header_map_value: (type, kp, kn) => {
      const k = str(kp, kn);
      h.maps[type] = (h.maps[type] ?? []).filter(([name]) => name !== k);
      return OK;
    },
    proxy_get_property: (pp, pn, retPtr, retSize) => {
      const v = h.props.get(str(pp, pn));
      if (v === undefined) return NOT_FOUND;
      return give(v, retPtr, retSize);
    },
    proxy_set_property: (pp, pn, vp, vn) => { h.props.set(str(pp, pn), Buffer.from(mem().subarray(vp, vp + vn))); return OK; },
    proxy_get_shared_data: (kp, kn, retPtr, retSize, retCas) => {
      const e = h.shared.get(str(kp, kn));
      if (!e) return NOT_FOUND;
      give(e.value, retPtr, retSize);
      view().setUint32(retCas, e.cas, true);
      return OK;
    },
    proxy_set_shared_data: (kp, kn, vp, vn, cas) => {
      const k = str(kp, kn);
      const e = h.shared.get(k);
      if (cas !== 0 && e && e.cas !== cas) return 8; // CasMismatch
      h.shared.set(k, { value: Buffer.from(mem().subarray(vp, vp + vn)), cas: (e?.cas ?? 0) + 1 });
      return OK;
    },
    proxy_define_metric: (type, np, nn, ret) => { h.metrics.push(0); view().setUint32(ret, h.metrics.length - 1, true); return OK; },
    proxy_increment_metric: (id, by) => { h.metrics[id] = (h.metrics[id] ?? 0) + Number(by); return OK; },
    proxy_record_metric: (id, v) => { h.metrics[id] = Number(v); return OK; },
    proxy_get_metric: () => BAD_ARGUMENT,
    proxy_send_local_response: () => { h.replies++; return OK; },
    proxy_continue_stream: () => OK,
    proxy_close_stream: () => OK,
    proxy_get_status: () => NOT_FOUND,
    proxy_done: () => OK,
    proxy_set_effective_context: () => OK,
    proxy_call_foreign_function: () => NOT_FOUND,
    proxy_http_call: () => BAD_ARGUMENT,
  };
  const importObject = { env: {}, wasi_snapshot_preview1: {} };
  for (const imp of WebAssembly.Module.imports(module)) {
    if (imp.kind !== 'function') continue;
    if (imp.module === 'env') {
      importObject.env[imp.name] = env[imp.name] ?? (() => NOT_FOUND);
    } else if (imp.module === 'wasi_snapshot_preview1') {
      importObject.wasi_snapshot_preview1[imp.name] = (...a) => {
        if (imp.name === 'environ_sizes_get' || imp.name === 'args_sizes_get') {
          view().setUint32(a[0], 0, true); view().setUint32(a[1], 0, true);
        } else if (imp.name === 'fd_write') {
          // Count the bytes as written.
          let n = 0;
          for (let i = 0; i < a[2]; i++) n += view().getUint32(a[1] + i * 8 + 4, true);
          view().setUint32(a[3], n, true);
        }
        return 0;
      };
    }
  }
  inst = await WebAssembly.instantiate(module, importObject);
  const x = inst.exports;
  x._initialize?.();
  x.proxy_on_context_create(1, 0);
  if (!x.proxy_on_vm_start(1, 0)) throw new Error(`${file}: on_vm_start refused`);
  if (!x.proxy_on_configure(1, CONFIG.length)) throw new Error(`${file}: on_configure refused the configuration`);
  return { file, x, h };
}

const body = chatBody(bodySize);
const requestHeaders = [
  [':authority', 'localhost:10000'], [':path', '/v1/chat/completions'], [':method', 'POST'],
  [':scheme', 'http'], ['content-type', 'application/json'], ['content-length', String(body.length)],
  ['user-agent', 'wrk'], ['x-forwarded-proto', 'http'], ['x-request-id', '0b5d6c1e-6f0e-4d8e-9a3c-2d0f7e4b1a9c'],
];
const responseHeaders = [
  [':status', '200'], ['content-type', 'application/json'], ['content-length', String(ANSWER.length)],
  ['server', 'nginx'], ['date', 'Tue, 01 Dec 2026 00:00:00 GMT'],
];

let nextId = 2;
// One request in route mode; returns what the filter did, for the first check.
function request(m) {
  const { x, h } = m;
  const id = nextId++;
  h.maps[0] = requestHeaders;
  h.maps[2] = responseHeaders;
  h.buffers[0] = body;
  h.buffers[1] = ANSWER;
  x.proxy_on_context_create(id, 1);
  const a1 = x.proxy_on_request_headers(id, requestHeaders.length, 0);
  const a2 = x.proxy_on_request_body(id, body.length, 1);
  const a3 = x.proxy_on_response_headers(id, responseHeaders.length, 0);
  const a4 = x.proxy_on_response_body(id, ANSWER.length, 1);
  x.proxy_on_log(id);
  x.proxy_on_done(id);
  x.proxy_on_delete(id);
  return [a1, a2, a3, a4];
}

const mods = [];
for (const f of files) mods.push(await load(f));
for (const m of mods) {
  const actions = request(m);
  const cluster = m.h.maps[0].find(([k]) => k === 'x-market-router-cluster' || k.endsWith('cluster'));
  const ours = m.h.maps[2].filter(([k]) => k.startsWith('x-market-router')).length;
  if (m.h.replies !== 0 || !cluster || ours === 0) {
    process.stderr.write(`${m.file}: not routed as expected (actions ${actions}, local replies ${m.h.replies}, cluster header ${cluster}, our response headers ${ours})\n`);
    process.exit(1);
  }
  process.stderr.write(`${m.file}: actions ${actions}, ${cluster.join('=')}, ${ours} response headers, decision record ${m.h.props.size ? 'set' : 'not set'}\n`);
  for (let i = 0; i < perSample; i++) request(m); // warm up
}
const times = mods.map(() => []);
for (let s = 0; s < samples; s++) {
  mods.forEach((m, i) => {
    const t = process.hrtime.bigint();
    for (let r = 0; r < perSample; r++) request(m);
    times[i].push(Number(process.hrtime.bigint() - t) / perSample);
  });
}
console.log(`${bodySize}-byte body, ${samples} samples of ${perSample} requests, ns per request (fastest / median):`);
mods.forEach((m, i) => {
  const t = times[i].slice().sort((a, b) => a - b);
  console.log(`  ${m.file}: ${t[0].toFixed(0)} / ${t[Math.floor(t.length / 2)].toFixed(0)}`);
});
