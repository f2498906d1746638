// Smoke test of Kiln's envd through the official E2B JS SDK (pinned in
// package.json). Run with E2B_DEBUG=true and envd on localhost:49983:
//   cd tests/sdk/js && E2B_DEBUG=true node smoke.mjs
// The last line is "N passed, N failed"; the exit code is non-zero on failure.
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'

import { CommandExitError, FileType, NotFoundError, Sandbox, TimeoutError } from 'e2b'

if (process.env.E2B_DEBUG !== 'true') {
  console.error('set E2B_DEBUG=true: debug mode makes the SDK talk to envd on localhost:49983')
  process.exit(2)
}

const results = { passed: 0, failed: 0 }
const tests = []
const test = (name, fn) => tests.push({ name, fn })

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
async function waitFor(pred, timeoutMs = 10_000) {
  const end = Date.now() + timeoutMs
  while (Date.now() < end) {
    if (await pred()) return true
    await sleep(50)
  }
  return pred()
}

const sbx = await Sandbox.create()
const dir = `/home/user/kiln-sdk-tests/js-${randomUUID().slice(0, 8)}`

test('sandbox is debug sandbox and healthy', async () => {
  assert.equal(sbx.sandboxId, 'debug_sandbox_id')
  assert.equal(await sbx.isRunning(), true)
})

test('commands.run echo', async () => {
  const r = await sbx.commands.run('echo hello from js')
  assert.equal(r.exitCode, 0)
  assert.equal(r.stdout, 'hello from js\n')
  assert.equal(r.stderr, '')
})

test('commands.run default user and cwd', async () => {
  const r = await sbx.commands.run('whoami; pwd')
  assert.equal(r.stdout, 'user\n/home/user\n')
})

test('commands.run envs and cwd', async () => {
  const r = await sbx.commands.run('echo "$KILN_JS $(pwd)"', { envs: { KILN_JS: 'yes' }, cwd: '/tmp' })
  assert.equal(r.stdout, 'yes /tmp\n')
})

test('commands.run non-zero exit throws CommandExitError', async () => {
  await assert.rejects(sbx.commands.run('echo err >&2; exit 3'), (e) => {
    assert.ok(e instanceof CommandExitError)
    assert.equal(e.exitCode, 3)
    assert.equal(e.stderr, 'err\n')
    return true
  })
})

test('commands.run onStdout callback', async () => {
  const chunks = []
  await sbx.commands.run('for i in 1 2 3; do echo $i; done', { onStdout: (d) => chunks.push(d) })
  assert.equal(chunks.join(''), '1\n2\n3\n')
})

test('commands.run timeout', async () => {
  await assert.rejects(sbx.commands.run('sleep 10', { timeoutMs: 1500 }), TimeoutError)
})

test('background command, list and kill', async () => {
  const h = await sbx.commands.run('sleep 30', { background: true })
  const procs = await sbx.commands.list()
  assert.ok(procs.some((p) => p.pid === h.pid), 'pid missing from list')
  assert.equal(await h.kill(), true)
  await assert.rejects(h.wait(), (e) => e instanceof CommandExitError && e.exitCode === -1)
})

test('stdin send and close', async () => {
  const h = await sbx.commands.run('cat', { background: true, stdin: true })
  await sbx.commands.sendStdin(h.pid, 'piped in')
  await sbx.commands.closeStdin(h.pid)
  const r = await h.wait()
  assert.equal(r.stdout, 'piped in')
})

test('connect to unknown pid is NotFoundError', async () => {
  await assert.rejects(sbx.commands.connect(999999), NotFoundError)
})

test('files write and read', async () => {
  const info = await sbx.files.write(`${dir}/a.txt`, 'js content')
  assert.equal(info.path, `${dir}/a.txt`)
  assert.equal(await sbx.files.read(`${dir}/a.txt`), 'js content')
  const bytes = await sbx.files.read(`${dir}/a.txt`, { format: 'bytes' })
  assert.deepEqual(Buffer.from(bytes), Buffer.from('js content'))
})

test('files write binary', async () => {
  const data = new Uint8Array(256).map((_, i) => i)
  await sbx.files.write(`${dir}/bin`, data.buffer)
  const got = await sbx.files.read(`${dir}/bin`, { format: 'bytes' })
  assert.deepEqual(Buffer.from(got), Buffer.from(data))
})

test('files list, getInfo, exists', async () => {
  await sbx.files.write([
    { path: `${dir}/list/b.txt`, data: 'b' },
    { path: `${dir}/list/a/inner.txt`, data: 'i' },
  ])
  const entries = await sbx.files.list(`${dir}/list`)
  assert.deepEqual(entries.map((e) => e.name), ['a', 'b.txt'])
  assert.equal(entries[0].type, FileType.DIR)
  const info = await sbx.files.getInfo(`${dir}/list/b.txt`)
  assert.equal(info.type, FileType.FILE)
  assert.equal(info.size, 1)
  assert.equal(info.owner, 'user')
  assert.equal(await sbx.files.exists(`${dir}/list/nope`), false)
})

test('files makeDir, rename, remove', async () => {
  assert.equal(await sbx.files.makeDir(`${dir}/mk`), true)
  assert.equal(await sbx.files.makeDir(`${dir}/mk`), false)
  await sbx.files.write(`${dir}/mk/f`, 'f')
  await sbx.files.rename(`${dir}/mk/f`, `${dir}/mk/g`)
  assert.equal(await sbx.files.read(`${dir}/mk/g`), 'f')
  await sbx.files.remove(`${dir}/mk`)
  assert.equal(await sbx.files.exists(`${dir}/mk`), false)
})

test('files read missing is NotFoundError', async () => {
  await assert.rejects(sbx.files.read(`${dir}/missing`), NotFoundError)
})

test('files watchDir sees a write', async () => {
  await sbx.files.makeDir(`${dir}/watch`)
  const events = []
  const handle = await sbx.files.watchDir(`${dir}/watch`, (e) => events.push(e))
  try {
    await sbx.files.write(`${dir}/watch/w.txt`, 'w')
    assert.ok(await waitFor(() => events.some((e) => e.name === 'w.txt')), JSON.stringify(events))
  } finally {
    await handle.stop()
  }
})

test('pty create, input, resize, kill', async () => {
  let out = ''
  const decoder = new TextDecoder()
  const pty = await sbx.pty.create({ cols: 80, rows: 24, onData: (d) => (out += decoder.decode(d)) })
  try {
    await sbx.pty.sendInput(pty.pid, new TextEncoder().encode('echo js-$((20+22))-pty\n'))
    assert.ok(await waitFor(() => out.includes('js-42-pty')), out)
    await sbx.pty.resize(pty.pid, { cols: 100, rows: 30 })
    await sbx.pty.sendInput(pty.pid, new TextEncoder().encode('echo size=$(stty size)=\n'))
    assert.ok(await waitFor(() => out.includes('size=30 100=')), out)
  } finally {
    assert.equal(await sbx.pty.kill(pty.pid), true)
  }
  await assert.rejects(pty.wait(), (e) => e instanceof CommandExitError && e.exitCode === -1)
})

for (const { name, fn } of tests) {
  try {
    await fn()
    results.passed++
    console.log(`ok   ${name}`)
  } catch (e) {
    results.failed++
    console.log(`FAIL ${name}\n     ${String(e?.stack || e).split('\n').join('\n     ')}`)
  }
}

try {
  await sbx.files.remove(dir)
} catch {}

console.log(`${results.passed} passed, ${results.failed} failed`)
process.exit(results.failed === 0 ? 0 : 1)
