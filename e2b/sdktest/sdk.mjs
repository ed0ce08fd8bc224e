// Drives warmpool's E2B API with the official E2B SDK (npm "e2b"), as a
// user's program would: the three environment variables E2B_API_URL,
// E2B_SANDBOX_URL and E2B_API_KEY point it at warmpool, TEMPLATE names
// the pool. Each check prints one JSON line {"check", "ok", ...}; the run
// exits non-zero when one fails. Run by e2b's Go test (sdk_test.go).
import { Sandbox, CommandExitError, AuthenticationError, SandboxError, NotFoundError } from 'e2b'
import { createHash, randomBytes } from 'node:crypto'

const template = process.env.TEMPLATE || 'base'
let failed = 0

function report(check, ok, detail = {}) {
  if (!ok) failed++
  console.log(JSON.stringify({ check, ok, ...detail }))
}

async function check(name, fn) {
  const start = performance.now()
  try {
    const detail = (await fn()) || {}
    report(name, true, { ms: Math.round(performance.now() - start), ...detail })
  } catch (err) {
    report(name, false, { error: `${err?.name}: ${err?.message}`, stack: err?.stack })
  }
}

function expect(cond, what) {
  if (!cond) throw new Error(what)
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const run = randomBytes(4).toString('hex')
let sbx, sbx2

await check('create', async () => {
  sbx = await Sandbox.create(template, { metadata: { suite: 'sdk', run }, envs: { SBX_ENV: 'from-create' }, timeoutMs: 120_000 })
  expect(sbx.sandboxId, 'no sandbox ID')
  return { sandboxId: sbx.sandboxId }
})
if (!sbx) {
  console.error('create failed; nothing else can run')
  process.exit(1)
}

await check('run echo hi', async () => {
  const r = await sbx.commands.run('echo hi')
  expect(r.exitCode === 0, `exit code ${r.exitCode}`)
  expect(r.stdout === 'hi\n', `stdout ${JSON.stringify(r.stdout)}`)
  expect(r.stderr === '', `stderr ${JSON.stringify(r.stderr)}`)
})

await check('failing command raises CommandExitError', async () => {
  try {
    await sbx.commands.run('echo partial; echo oops >&2; exit 3')
  } catch (err) {
    expect(err instanceof CommandExitError, `got ${err?.name}: ${err?.message}`)
    expect(err.exitCode === 3, `exit code ${err.exitCode}`)
    expect(err.stderr === 'oops\n', `stderr ${JSON.stringify(err.stderr)}`)
    expect(err.stdout === 'partial\n', `stdout ${JSON.stringify(err.stdout)}`)
    return { exitCode: err.exitCode }
  }
  throw new Error('no error raised')
})

await check('envs and cwd apply', async () => {
  const r = await sbx.commands.run('echo "$SBX_ENV $CMD_ENV"; pwd', { envs: { CMD_ENV: 'from-run' }, cwd: '/tmp' })
  expect(r.stdout === 'from-create from-run\n/tmp\n', `stdout ${JSON.stringify(r.stdout)}`)
  const o = await sbx.commands.run('echo "$SBX_ENV"', { envs: { SBX_ENV: 'overridden' } })
  expect(o.stdout === 'overridden\n', `a command's envs must win over the sandbox's: ${JSON.stringify(o.stdout)}`)
})

await check('background command streams and is killed', async () => {
  let out = ''
  const h = await sbx.commands.run('i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done', {
    background: true,
    onStdout: (d) => { out += d },
  })
  for (let i = 0; i < 100 && !out.includes('tick 2'); i++) await sleep(100)
  expect(out.includes('tick 0\ntick 1\ntick 2'), `streamed ${JSON.stringify(out)}`)
  const listed = await sbx.commands.list()
  expect(listed.some((p) => p.pid === h.pid), `pid ${h.pid} not in commands.list(): ${JSON.stringify(listed)}`)
  expect(await h.kill(), 'kill() answered false')
  let waitErr
  try { await h.wait() } catch (err) { waitErr = err }
  expect(waitErr instanceof CommandExitError, `wait after kill: ${waitErr?.name}: ${waitErr?.message}`)
  const seen = out.length
  await sleep(600)
  expect(out.length === seen, 'output kept coming after kill')
  const after = await sbx.commands.list()
  expect(!after.some((p) => p.pid === h.pid), `pid ${h.pid} still listed after kill`)
  expect(!(await sbx.commands.kill(h.pid)), 'killing a gone process must answer false')
  return { pid: h.pid, streamed: out.split('\n').length - 1 }
})

await check('stdin: sendStdin reaches a running command', async () => {
  const h = await sbx.commands.run('while read l; do echo "got $l"; done; echo eof', { background: true, stdin: true })
  await h.sendStdin('one\n')
  await sbx.commands.sendStdin(h.pid, 'two\n')
  await h.closeStdin()
  const r = await h.wait()
  expect(r.stdout === 'got one\ngot two\neof\n', `stdout ${JSON.stringify(r.stdout)}`)
})

await check('pty: create, sendInput, resize', async () => {
  let out = ''
  const dec = new TextDecoder()
  const t = await sbx.pty.create({ rows: 10, cols: 40, onData: (d) => { out += dec.decode(d) } })
  const enc = new TextEncoder()
  await sbx.pty.sendInput(t.pid, enc.encode('stty size\n'))
  for (let i = 0; i < 100 && !out.includes('10 40'); i++) await sleep(100)
  expect(out.includes('10 40'), `no "10 40" from stty size: ${JSON.stringify(out)}`)
  await sbx.pty.resize(t.pid, { rows: 20, cols: 100 })
  await sbx.pty.sendInput(t.pid, enc.encode('stty size; exit 5\n'))
  let waitErr
  try { await t.wait() } catch (err) { waitErr = err }
  expect(out.includes('20 100'), `no "20 100" after resize: ${JSON.stringify(out)}`)
  expect(waitErr instanceof CommandExitError && waitErr.exitCode === 5, `pty end: ${waitErr?.name}: ${waitErr?.message}`)
  return { pid: t.pid }
})

await check('background command survives its client and commands.connect reattaches', async () => {
  let before = ''
  const h = await sbx.commands.run('echo begun; while [ ! -e /tmp/e2b-go ]; do sleep 0.1; done; echo resumed; exit 4', {
    background: true, timeoutMs: 0, onStdout: (d) => { before += d },
  })
  for (let i = 0; i < 100 && !before.includes('begun'); i++) await sleep(100)
  expect(before === 'begun\n', `before disconnect: ${JSON.stringify(before)}`)
  await h.disconnect()
  await sleep(500)
  const listed = await sbx.commands.list()
  expect(listed.some((p) => p.pid === h.pid), `pid ${h.pid} gone once its client disconnected: ${JSON.stringify(listed)}`)
  let after = ''
  const again = await sbx.commands.connect(h.pid, { onStdout: (d) => { after += d } })
  await sbx.files.write('/tmp/e2b-go', '')
  let waitErr
  try { await again.wait() } catch (err) { waitErr = err }
  expect(waitErr instanceof CommandExitError && waitErr.exitCode === 4, `reconnected wait: ${waitErr?.name}: ${waitErr?.message}`)
  expect(after === 'resumed\n', `reconnected stdout ${JSON.stringify(after)}`)
  return { pid: h.pid }
})

await check('files write and read 1 MiB exactly', async () => {
  const data = randomBytes(1 << 20)
  const info = await sbx.files.write('/tmp/e2b-blob', data.buffer.slice(data.byteOffset, data.byteOffset + data.length))
  expect(info.path === '/tmp/e2b-blob', `write answered ${JSON.stringify(info)}`)
  const back = await sbx.files.read('/tmp/e2b-blob', { format: 'bytes' })
  const sum = (b) => createHash('sha256').update(b).digest('hex')
  expect(back.length === data.length, `read ${back.length} bytes, wrote ${data.length}`)
  expect(sum(back) === sum(data), 'content differs')
  const text = await sbx.files.write('notes/hello.txt', 'hello\n')
  const r = await sbx.commands.run('cat ~/notes/hello.txt')
  expect(r.stdout === 'hello\n', `a relative path is relative to the home directory: ${JSON.stringify(r.stdout)} (${text.path})`)
  expect((await sbx.files.read('notes/hello.txt')) === 'hello\n', 'text read')
  return { sha256: sum(back).slice(0, 16) }
})

await check('files list, exists, makeDir, rename, remove', async () => {
  const entries = await sbx.files.list('/tmp')
  const blob = entries.find((e) => e.name === 'e2b-blob')
  expect(blob && blob.type === 'file' && blob.size === 1 << 20 && blob.path === '/tmp/e2b-blob', `list: ${JSON.stringify(entries)}`)
  expect(await sbx.files.exists('/tmp/e2b-blob'), 'exists(blob) false')
  expect(!(await sbx.files.exists('/tmp/e2b-nope')), 'exists(missing) true')
  expect(await sbx.files.makeDir('/tmp/e2b-dir/sub'), 'makeDir false')
  expect(!(await sbx.files.makeDir('/tmp/e2b-dir/sub')), 'makeDir of an existing dir must answer false')
  const moved = await sbx.files.rename('/tmp/e2b-blob', '/tmp/e2b-dir/blob')
  expect(moved.path === '/tmp/e2b-dir/blob', `rename: ${JSON.stringify(moved)}`)
  const deep = await sbx.files.list('/tmp/e2b-dir', { depth: 2 })
  expect(deep.some((e) => e.path === '/tmp/e2b-dir/sub' && e.type === 'dir') && deep.some((e) => e.path === '/tmp/e2b-dir/blob'), `list depth 2: ${JSON.stringify(deep)}`)
  await sbx.files.remove('/tmp/e2b-dir')
  expect(!(await sbx.files.exists('/tmp/e2b-dir')), 'removed dir still exists')
  let readErr
  try { await sbx.files.read('/tmp/e2b-dir/blob') } catch (err) { readErr = err }
  expect(readErr instanceof NotFoundError, `read of a removed file: ${readErr?.name}: ${readErr?.message}`)
})

await check('files.watchDir reports a files.write', async () => {
  const dir = `/tmp/e2b-watch-${run}`
  await sbx.files.makeDir(dir)
  const seen = []
  let resolve
  const arrived = new Promise((r) => { resolve = r })
  let wrote = 0
  const h = await sbx.files.watchDir(dir, (ev) => {
    seen.push(ev)
    if (ev.name === 'w.txt' && (ev.type === 'write' || ev.type === 'create')) resolve(performance.now() - wrote)
  })
  wrote = performance.now()
  await sbx.files.write(`${dir}/w.txt`, 'watched\n')
  const writeMs = performance.now() - wrote
  const ms = await Promise.race([arrived, sleep(5000).then(() => -1)])
  await h.stop()
  expect(ms >= 0, `no create or write of w.txt within 5 s: ${JSON.stringify(seen)}`)
  let missing
  try { await sbx.files.watchDir(`${dir}/nope`, () => {}) } catch (err) { missing = err }
  expect(missing instanceof NotFoundError, `watchDir of a missing directory: ${missing?.name}: ${missing?.message}`)
  await sbx.files.remove(dir)
  return { writeToEventMs: Math.round(ms), writeMs: Math.round(writeMs), events: seen.map((e) => `${e.type} ${e.name}`) }
})

await check('Sandbox.list shows the sandbox', async () => {
  const page = await Sandbox.list({ query: { metadata: { run } } }).nextItems()
  const me = page.find((s) => s.sandboxId === sbx.sandboxId)
  expect(me, `not listed: ${JSON.stringify(page)}`)
  expect(me.metadata.suite === 'sdk' && me.templateId === template && me.state === 'running', `listed as ${JSON.stringify(me)}`)
  const none = await Sandbox.list({ query: { metadata: { run: 'other' } } }).nextItems()
  expect(!none.some((s) => s.sandboxId === sbx.sandboxId), 'metadata filter ignored')
})

await check('setTimeout moves the end', async () => {
  const before = await sbx.getInfo()
  await sbx.setTimeout(600_000)
  const after = await sbx.getInfo()
  const left = after.endAt.getTime() - Date.now()
  expect(left > 590_000 && left <= 601_000, `endAt ${after.endAt.toISOString()} is ${left} ms away, want ~600 s (was ${before.endAt.toISOString()})`)
  return { endAt: after.endAt.toISOString() }
})

await check('two sandboxes share neither hostname nor /dev/urandom', async () => {
  sbx2 = await Sandbox.create(template, { timeoutMs: 120_000 })
  // sbx2's first command runs in the shell its VM's warm-up left parked
  // (started before the hand-off, in every clone alike): bash's HOSTNAME
  // and RANDOM must still be this sandbox's own.
  const probe = 'hostname; head -c 32 /dev/urandom | od -An -tx1 | tr -d " \\n"; echo; echo "$HOSTNAME"; echo "$RANDOM$RANDOM$RANDOM"'
  const [a, b] = await Promise.all([sbx.commands.run(probe), sbx2.commands.run(probe)])
  const [ha, ra, hva, na] = a.stdout.trim().split('\n')
  const [hb, rb, hvb, nb] = b.stdout.trim().split('\n')
  expect(ha && hb && ha !== hb, `hostnames ${ha} and ${hb}`)
  expect(hva === ha && hvb === hb && hb === sbx2.sandboxId, `$HOSTNAME ${hva} and ${hvb}, hostnames ${ha} and ${hb}, sandbox ${sbx2.sandboxId}`)
  expect(ra && rb && ra.length === 64 && ra !== rb, `urandom ${ra} and ${rb}`)
  expect(na && nb && na !== nb, `bash's $RANDOM ${na} and ${nb}`)
  return { hostnames: [ha, hb] }
})

await check('kill, then commands fail', async () => {
  const id = sbx2.sandboxId
  await sbx2.kill()
  let err
  try { await sbx2.commands.run('echo still here') } catch (e) { err = e }
  expect(err instanceof SandboxError, `run after kill: ${err ? `${err.name}: ${err.message}` : 'no error'}`)
  const page = await Sandbox.list().nextItems()
  expect(!page.some((s) => s.sandboxId === id), 'killed sandbox still listed')
  expect(!(await Sandbox.kill(id)), 'killing twice must answer false')
  return { error: err.name }
})

await check('wrong API key raises AuthenticationError', async () => {
  try {
    await Sandbox.create(template, { apiKey: 'e2b_' + '0'.repeat(40) })
  } catch (err) {
    expect(err instanceof AuthenticationError, `got ${err?.name}: ${err?.message}`)
    return
  }
  throw new Error('create with a wrong key succeeded')
})

await check('unknown template raises a not-found error', async () => {
  try {
    await Sandbox.create('no-such-template-' + run)
  } catch (err) {
    expect(err instanceof SandboxError && err.statusCode === 404, `got ${err?.name} (status ${err?.statusCode}): ${err?.message}`)
    expect(err.message.includes('no-such-template-' + run), `message does not name the template: ${err.message}`)
    return { error: `${err.name} ${err.statusCode}` }
  }
  throw new Error('create from an unknown template succeeded')
})

await sbx.kill()
process.exit(failed ? 1 : 0)
