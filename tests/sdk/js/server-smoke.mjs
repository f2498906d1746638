// The official E2B JS SDK (pinned in package.json) against a running
// `kiln serve` (no debug mode). scripts/test.sh sets E2B_API_URL,
// E2B_SANDBOX_URL and E2B_API_KEY. The last line is "N passed, N failed".
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'

import { NotFoundError, Sandbox } from 'e2b'

for (const v of ['E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY']) {
  if (!process.env[v]) {
    console.error(`missing ${v}: run through scripts/test.sh, which starts kiln serve`)
    process.exit(2)
  }
}
if (process.env.E2B_DEBUG) {
  console.error('E2B_DEBUG must not be set: this test goes through the control API')
  process.exit(2)
}

const results = { passed: 0, failed: 0 }
const tests = []
const test = (name, fn) => tests.push({ name, fn })
const tag = randomUUID()

let sbx
test('create with metadata and env vars', async () => {
  sbx = await Sandbox.create({ metadata: { tag }, envs: { FROM_JS: 'yes' }, timeoutMs: 120_000 })
  assert.match(sbx.sandboxId, /^[a-z0-9]{20}$/)
  assert.equal(await sbx.isRunning(), true)
})

test('commands through the proxy', async () => {
  const r = await sbx.commands.run('echo $FROM_JS; whoami')
  assert.equal(r.stdout, 'yes\nuser\n')
})

test('files through the proxy', async () => {
  await sbx.files.write('/home/user/js.txt', 'written by js')
  assert.equal(await sbx.files.read('/home/user/js.txt'), 'written by js')
  const names = (await sbx.files.list('/home/user')).map((e) => e.name)
  assert.ok(names.includes('js.txt'))
})

test('list filters by metadata', async () => {
  const page = await Sandbox.list({ query: { metadata: { tag } } }).nextItems()
  assert.deepEqual(page.map((s) => s.sandboxId), [sbx.sandboxId])
  assert.equal(page[0].state, 'running')
})

test('getInfo and setTimeout', async () => {
  const before = await sbx.getInfo()
  assert.equal(before.metadata.tag, tag)
  await sbx.setTimeout(600_000)
  const after = await sbx.getInfo()
  assert.ok(after.endAt.getTime() - before.endAt.getTime() > 400_000)
})

test('pause and connect keep files', async () => {
  await sbx.pause()
  assert.equal(await sbx.isRunning(), false)
  const again = await Sandbox.connect(sbx.sandboxId)
  assert.equal(await again.files.read('/home/user/js.txt'), 'written by js')
  assert.equal((await again.commands.run('echo back')).stdout, 'back\n')
})

test('kill, then not found', async () => {
  assert.equal(await Sandbox.kill(sbx.sandboxId), true)
  assert.equal(await Sandbox.kill(sbx.sandboxId), false)
  await assert.rejects(Sandbox.getInfo(sbx.sandboxId), NotFoundError)
})

for (const { name, fn } of tests) {
  try {
    await fn()
    results.passed++
    console.log(`ok   ${name}`)
  } catch (e) {
    results.failed++
    console.log(`FAIL ${name}: ${e?.stack ?? e}`)
  }
}
console.log(`${results.passed} passed, ${results.failed} failed`)
process.exit(results.failed ? 1 : 0)
