#!/usr/bin/env node
// WASI runner for wasm32-wasip1 binaries (used as CARGO_TARGET_WASM32_WASIP1_RUNNER).
//
//   node scripts/wasi-run.mjs <file.wasm> [args...]
//
// Runs the module's _start under Node's built-in WASI (preview1) with the given args and the
// current environment, the current directory preopened as ".", and exits with the module's
// exit code. A trap (e.g. a panic under panic=abort) exits with 101, like a failed Rust test;
// set WASI_RUN_TRACE=1 to print the wasm stack of a trap.
// Imports outside WASI (e.g. proxy-wasm hostcalls linked into a test binary) are stubbed with
// functions that throw if they are ever called.

import { readFile } from 'node:fs/promises';
import process from 'node:process';

// Node prints an ExperimentalWarning for WASI; keep every other warning.
const emitWarning = process.emitWarning.bind(process);
process.emitWarning = (warning, ...rest) => {
  const type = typeof rest[0] === 'string' ? rest[0] : rest[0]?.type;
  const text = typeof warning === 'string' ? warning : warning?.message ?? '';
  if ((type === 'ExperimentalWarning' || warning?.name === 'ExperimentalWarning') && /WASI/i.test(text)) {
    return;
  }
  emitWarning(warning, ...rest);
};

const { WASI } = await import('node:wasi');

const [file, ...args] = process.argv.slice(2);
if (!file) {
  process.stderr.write('usage: node scripts/wasi-run.mjs <file.wasm> [args...]\n');
  process.exit(2);
}

let module;
try {
  module = await WebAssembly.compile(await readFile(file));
} catch (err) {
  process.stderr.write(`wasi-run: cannot load ${file}: ${err.message}\n`);
  process.exit(2);
}

const wasi = new WASI({
  version: 'preview1',
  args: [file, ...args],
  env: { ...process.env },
  preopens: { '.': process.cwd() },
  returnOnExit: true,
});

const imports = { wasi_snapshot_preview1: wasi.wasiImport };
for (const imp of WebAssembly.Module.imports(module)) {
  if (imp.module === 'wasi_snapshot_preview1' || imp.kind !== 'function') continue;
  imports[imp.module] ??= {};
  imports[imp.module][imp.name] = () => {
    throw new Error(`wasi-run: host function ${imp.module}.${imp.name} is not available here`);
  };
}

let code;
try {
  const instance = await WebAssembly.instantiate(module, imports);
  // A binary linked with a library that also exports _initialize (proxy-wasm does) has both
  // entry points; Node's WASI.start refuses that, so hand it only what a command needs.
  const { memory, _start } = instance.exports;
  code = wasi.start({ exports: { memory, _start } });
} catch (err) {
  if (err instanceof WebAssembly.RuntimeError && /unreachable/.test(err.message)) {
    // std::process::abort, which is what a panic is under panic=abort: the panic message
    // (printed by the panic hook before this) says why. libtest cannot go on after it.
    process.stderr.write(`wasi-run: ${file} aborted (a panic under panic=abort; its message is above)\n`);
  } else {
    process.stderr.write(`wasi-run: ${file} trapped: ${err && err.stack ? err.stack : err}\n`);
  }
  if (process.env.WASI_RUN_TRACE && err && err.stack) process.stderr.write(`${err.stack}\n`);
  code = 101;
}
process.exitCode = code ?? 0;
