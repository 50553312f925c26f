// Stop what the lab started (daemons by recorded PID, nbe2e-* domains) once the
// e2e files are done, so a CI run leaves no libvirtd behind.
import { execFileSync } from 'node:child_process';
import { LAB_SCRIPT } from './lab.js';

export default function setup(): () => void {
  return () => {
    execFileSync('node', [LAB_SCRIPT, 'stop'], { stdio: 'inherit', timeout: 120_000 });
  };
}
