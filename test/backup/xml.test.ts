// The libvirt XML documents: every name and path escaped (the original interpolated
// them into strings), read back by an XML parser exactly as given.
import fc from 'fast-check';
import { create } from 'xmlbuilder2';
import { describe, expect, it } from 'vitest';
import { backupXml, checkpointXml, redefineCheckpointXml } from '../../lib/ops/backup/xml.js';

/** The few DOM members used here (the test build has no DOM lib). */
interface XmlElement {
  getAttribute(name: string): string | null;
  getElementsByTagName(tag: string): ArrayLike<XmlElement>;
  textContent: string | null;
}
/** Parse with a real XML parser (xmlbuilder2's DOM): what libvirt would read. */
const parse = (xml: string): XmlElement => create(xml).root().node as unknown as XmlElement;
const all = (el: XmlElement, tag: string): XmlElement[] => Array.from(el.getElementsByTagName(tag));
const one = (el: XmlElement, tag: string): XmlElement => all(el, tag)[0]!;

describe('backupXml', () => {
  it('a full push backup: one disk element per target, no <incremental>', () => {
    const xml = backupXml(
      [
        { name: 'vda', file: '/mnt/csbackup.Ab3xZ/i-2-10-VM/2025.01.04.00.00.00.partial/root.b3f4.qcow2' },
        { name: 'vdb', file: '/mnt/csbackup.Ab3xZ/i-2-10-VM/2025.01.04.00.00.00.partial/datadisk.c9e8.qcow2' },
      ],
      null,
    );
    expect(xml).toBe(
      '<domainbackup mode="push">\n' +
        '  <disks>\n' +
        '    <disk name="vda" backup="yes" type="file">\n' +
        '      <driver type="qcow2"/>\n' +
        '      <target file="/mnt/csbackup.Ab3xZ/i-2-10-VM/2025.01.04.00.00.00.partial/root.b3f4.qcow2"/>\n' +
        '    </disk>\n' +
        '    <disk name="vdb" backup="yes" type="file">\n' +
        '      <driver type="qcow2"/>\n' +
        '      <target file="/mnt/csbackup.Ab3xZ/i-2-10-VM/2025.01.04.00.00.00.partial/datadisk.c9e8.qcow2"/>\n' +
        '    </disk>\n' +
        '  </disks>\n' +
        '</domainbackup>\n',
    );
  });

  it('quotes, ampersands and angle brackets in paths and names are escaped and read back verbatim', () => {
    const file = `/nas/it's "a" <dir> & more/root.x.qcow2`;
    const xml = backupXml([{ name: 'vd"a&<', file }], `ck'&<"1>`);
    expect(xml).toContain('<incremental>ck\'&amp;&lt;"1&gt;</incremental>');
    expect(xml).toContain('<disk name="vd&quot;a&amp;&lt;" backup="yes" type="file">');
    const doc = parse(xml);
    expect(one(doc, 'incremental').textContent).toBe(`ck'&<"1>`);
    expect(one(doc, 'disk').getAttribute('name')).toBe('vd"a&<');
    expect(one(doc, 'target').getAttribute('file')).toBe(file);
  });

  it('property: any printable name and path round-trips through an XML parser', () => {
    const text = fc.string({ unit: 'grapheme', minLength: 1, maxLength: 40 }).filter((s) => !/[\u0000-\u001f\u007f\ufffe\uffff]/.test(s));
    fc.assert(
      // (A text of spaces only would be ignorable whitespace to a parser; checkpoint names never are.)
      fc.property(
        text,
        text,
        fc.option(
          text.filter((t) => /[^ ]/.test(t)),
          { nil: null },
        ),
        (name, file, inc) => {
          const doc = parse(backupXml([{ name, file }], inc));
          expect(one(doc, 'disk').getAttribute('name')).toBe(name);
          expect(one(doc, 'target').getAttribute('file')).toBe(file);
          expect(all(doc, 'incremental').map((e) => e.textContent)).toEqual(inc === null ? [] : [inc]);
        },
      ),
      { numRuns: 200 },
    );
  });
});

describe('checkpoint XML', () => {
  it('a new checkpoint: its name and one bitmap disk per target', () => {
    expect(checkpointXml('backup-1736035200', ['vda', 'vdb'])).toBe(
      '<domaincheckpoint>\n  <name>backup-1736035200</name>\n  <disks>\n' +
        '    <disk name="vda" checkpoint="bitmap"/>\n    <disk name="vdb" checkpoint="bitmap"/>\n' +
        '  </disks>\n</domaincheckpoint>\n',
    );
    expect(one(parse(checkpointXml(`b<&>'"`, ['vda'])), 'name').textContent).toBe(`b<&>'"`);
  });

  it('a redefinition: name, creationTime (libvirt refuses one without) and the bitmap of every disk', () => {
    const doc = parse(redefineCheckpointXml('backup-1735689600', 1735689600, ['vda', 'vdb']));
    expect(one(doc, 'name').textContent).toBe('backup-1735689600');
    expect(one(doc, 'creationTime').textContent).toBe('1735689600');
    expect(all(doc, 'disk').map((d) => [d.getAttribute('name'), d.getAttribute('checkpoint'), d.getAttribute('bitmap')])).toEqual([
      ['vda', 'bitmap', 'backup-1735689600'],
      ['vdb', 'bitmap', 'backup-1735689600'],
    ]);
  });
});
