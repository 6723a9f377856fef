// Child process of the raw TCP baseline (the receiving "host"): accepts one connection, writes what
// it receives to a file, and reports on stdout as JSON lines: {port} once listening, then {bytes}
// once the file is written and closed.
import { createWriteStream } from 'node:fs';
import net from 'node:net';

const file = process.argv[2];
if (!file) {
  process.stderr.write('usage: tcp-sink FILE\n');
  process.exit(2);
}
const server = net.createServer((socket) => {
  const out = createWriteStream(file, { highWaterMark: 1 << 20 });
  let bytes = 0;
  socket.on('data', (c: Buffer) => (bytes += c.length));
  socket.pipe(out);
  out.on('close', () => {
    process.stdout.write(`${JSON.stringify({ bytes })}\n`);
    socket.end();
    server.close();
  });
});
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`${JSON.stringify({ port: (server.address() as net.AddressInfo).port })}\n`);
});
