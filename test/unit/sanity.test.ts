import { describe, expect, it } from 'vitest';
import { VirshClient } from '../../lib/clients/virsh.js';
import { compareVersions, unsupportedMessage } from '../../lib/sanity.js';
import { ok, scriptedRunner } from '../helpers/runner.js';

/** What the virsh client makes of `virsh version` printing `text` (its text left out). */
async function parseVirshVersion(text: string): Promise<object> {
  const { text: _text, ...versions } = await new VirshClient(scriptedRunner(() => ok(text)).runner, 'virsh', 1000).version();
  return versions;
}

describe('virsh version parsing', () => {
  it('takes the hypervisor line, the last libvirt line and the API line', async () => {
    const text =
      'Compiled against library: libvirt 9.0.0\nUsing library: libvirt 9.1.0\nUsing API: QEMU 9.0.0\nRunning hypervisor: QEMU 7.2.22\nRunning against daemon: 9.0.0\n\n';
    expect(await parseVirshVersion(text)).toEqual({ qemu: '7.2.22', libvirt: '9.1.0', api: '9.0.0' });
  });
  it('leaves out what is missing', async () => {
    expect(await parseVirshVersion('Compiled against library: libvirt 9.0.0\n')).toEqual({ libvirt: '9.0.0' });
    expect(await parseVirshVersion('')).toEqual({});
  });
});

describe('compareVersions', () => {
  it.each([
    ['4.2.0', '4.2.0', 0],
    ['4.2', '4.2.0', 0],
    ['4.1.9', '4.2.0', -1],
    ['10.0.0', '7.2.0', 1],
    ['7.2.22', '7.2.3', 1],
    ['7', '7.2.0', -1],
    ['8.2.2-rc1', '8.2.2', 0],
  ])('%s vs %s = %d', (a, b, r) => {
    expect(compareVersions(a, b)).toBe(r);
  });
});

it('renders the original unsupported-version message', () => {
  expect(unsupportedMessage({ qemu: '4.1.0', libvirt: '9.0.0', api: '9.0.0' })).toBe(
    'Failure... Your QEMU version 4.1.0 or libvirt version 9.0.0 is unsupported. Consider upgrading to the required minimum version of QEMU: 4.2.0 and Libvirt: 7.2.0',
  );
});
