// Writes test/golden/DIVERGENCES.md from test/golden/divergences.json (and the project's
// fixtures and extra fixtures, for the "applies to" column). Run: npm run golden:divergences
import { writeFileSync } from 'node:fs';
import { EXTRA_FIXTURES, loadFixtures, PROJECT_FIXTURES } from '../test/golden/fixture.js';
import { DIVERGENCES_MD, renderDivergences } from '../test/golden/render.js';
import { loadTable } from '../test/golden/rules.js';

writeFileSync(DIVERGENCES_MD, renderDivergences(loadTable(), loadFixtures(PROJECT_FIXTURES, EXTRA_FIXTURES)));
console.log(`wrote ${DIVERGENCES_MD}`);
