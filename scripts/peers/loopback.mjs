// Node preload (`node --import ./loopback.mjs server.js`): every TCP server that listens on a
// port without naming a host listens on 127.0.0.1 instead of all interfaces. Portkey's gateway
// (build/start-server.js) takes only --port, so this keeps the benchmark and the layering test
// on loopback.
import net from 'node:net';

const listen = net.Server.prototype.listen;

net.Server.prototype.listen = function (...args) {
  const [first] = args;
  if (typeof first === 'number' || (typeof first === 'string' && /^\d+$/.test(first))) {
    const callback = args.find((a) => typeof a === 'function');
    const options = { port: Number(first), host: '127.0.0.1' };
    return callback ? listen.call(this, options, callback) : listen.call(this, options);
  }
  if (first && typeof first === 'object' && first.port !== undefined && !first.host && !first.path) {
    args[0] = { ...first, host: '127.0.0.1' };
  }
  return listen.apply(this, args);
};
