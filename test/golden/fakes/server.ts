// The shims: one small bash script per faked command, first on the program's PATH.
// Each sends its name, working directory and argv (NUL-separated) to the harness over
// a loopback TCP connection (bash's /dev/tcp: no extra tools, a few ms per call),
// then replays the answer: stderr first, then stdout, then the exit code. Calls are
// handled one at a time, in arrival (= start) order, and appended to calls.jsonl.
import { appendFileSync, chmodSync, mkdirSync, writeFileSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import type { FakeHost } from './host.js';

export const FAKED = ['virsh', 'mount', 'umount', 'df', 'sync', 'sleep', 'qemu-img'] as const;

function shim(name: string, port: number, outDir: string): string {
  return `#!/bin/bash
# nasbackup golden replay: fake \`${name}\`, answered by the harness (test/golden/fakes).
exec 3<>/dev/tcp/127.0.0.1/${port} || { echo "fake ${name}: harness not reachable" >&2; exit 99; }
printf '%s\\0%s\\0%s\\0' '${name}' "$PWD" "$#" >&3
(( $# )) && printf '%s\\0' "$@" >&3
IFS=' ' read -r id rc <&3 || { echo "fake ${name}: no answer" >&2; exit 99; }
exec 3<&-
IFS= read -r -d '' err < '${outDir}'/"$id".err
IFS= read -r -d '' out < '${outDir}'/"$id".out
printf '%s' "$err" >&2
printf '%s' "$out"
exit "$rc"
`;
}

export class ShimServer {
  private server: Server | null = null;
  private queue: Promise<void> = Promise.resolve();
  private readonly sockets = new Set<Socket>();

  constructor(
    private readonly host: FakeHost,
    private readonly dir: string,
    private readonly callsFile: string,
  ) {}

  /** Listen, then write the shims into `<dir>/bin` (returned: put it first on PATH). */
  async start(): Promise<string> {
    this.server = createServer((sock) => this.accept(sock));
    await new Promise<void>((res) => this.server!.listen(0, '127.0.0.1', res));
    const port = (this.server.address() as { port: number }).port;
    const bin = join(this.dir, 'bin');
    const out = join(this.dir, 'io');
    mkdirSync(bin, { recursive: true });
    mkdirSync(out, { recursive: true });
    for (const name of FAKED) {
      const p = join(bin, name);
      writeFileSync(p, shim(name, port, out));
      chmodSync(p, 0o755);
    }
    return bin;
  }

  private accept(sock: Socket): void {
    this.sockets.add(sock);
    sock.on('close', () => this.sockets.delete(sock));
    sock.on('error', () => {});
    let buf = Buffer.alloc(0);
    let done = false;
    sock.on('data', (chunk: Buffer) => {
      if (done) return;
      buf = Buffer.concat([buf, chunk]);
      const fields: string[] = [];
      let start = 0;
      for (let i = 0; i < buf.length; i++) {
        if (buf[i] === 0) {
          fields.push(buf.subarray(start, i).toString('utf8'));
          start = i + 1;
        }
      }
      if (fields.length < 3) return;
      const argc = Number(fields[2]);
      if (fields.length < 3 + argc) return;
      done = true;
      const [cmd = '', cwd = ''] = fields;
      const argv = fields.slice(3, 3 + argc);
      this.queue = this.queue.then(async () => {
        const call = await this.host.handle(cmd, argv, cwd);
        const out = join(this.dir, 'io', String(call.seq));
        writeFileSync(`${out}.out`, call.stdout);
        writeFileSync(`${out}.err`, call.stderr);
        appendFileSync(this.callsFile, JSON.stringify(call) + '\n');
        sock.end(`${call.seq} ${call.exitCode}\n`);
      });
    });
  }

  async stop(): Promise<void> {
    await this.queue;
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((res) => (this.server ? this.server.close(() => res()) : res()));
  }
}
