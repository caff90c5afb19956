"""launch/ scripts: their --dry-run output (no gcloud or Slurm needed) and the sweep's Slurm array."""

import os
import shlex
import subprocess
import sys

from conftest import REPO


def _dry_run(script, *args, env=None):
  out = subprocess.run(
    ['bash', str(REPO / 'launch' / script), *args, '--dry-run'],
    capture_output=True,
    text=True,
    cwd=REPO,
    env={**os.environ, **(env or {})},
    timeout=30,
  )
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines()


def test_tpu_vm_dry_run_prints_each_gcloud_command():
  where = ['--name', 'pod', '--zone', 'us-central2-b']
  (create,) = _dry_run('tpu_vm.sh', 'create', *where, '--type', 'v4-32', '--project', 'proj', '--spot')
  assert shlex.split(create) == [
    'gcloud',
    'compute',
    'tpus',
    'tpu-vm',
    'create',
    'pod',
    '--zone=us-central2-b',
    '--project=proj',
    '--accelerator-type=v4-32',
    '--version=tpu-ubuntu2204-base',
    '--spot',
  ]
  archive, scp, ssh = map(shlex.split, _dry_run('tpu_vm.sh', 'install', *where))
  assert archive[:4] == ['git', '-C', str(REPO), 'archive'] and archive[-1] == 'HEAD'
  assert scp[4] == 'scp' and '--worker=all' in scp
  assert ssh[4:6] == ['ssh', 'pod'] and '--worker=all' in ssh
  assert "pip install -U 'jax[tpu]' -e ~/jaxad" in ssh[-1]
  (run,) = _dry_run(
    'tpu_vm.sh',
    'run',
    *where,
    '--',
    '--config',
    'configs/sivt.py:paper',
    '--workdir',
    '/mnt/runs/a b',
    '--config.batch_size=64',
  )
  run = shlex.split(run)
  assert run[4:6] == ['ssh', 'pod'] and '--worker=all' in run
  remote = run[-1].removeprefix('--command=')
  assert shlex.split(remote) == [
    'cd',
    '~/jaxad',
    '&&',
    'python',
    '-m',
    'jaxad.main',
    '--distributed',
    '--config',
    'configs/sivt.py:paper',
    '--workdir',
    '/mnt/runs/a b',
    '--config.batch_size=64',
  ]
  (delete,) = _dry_run('tpu_vm.sh', 'delete', *where)
  assert shlex.split(delete) == [
    'gcloud',
    'compute',
    'tpus',
    'tpu-vm',
    'delete',
    'pod',
    '--zone=us-central2-b',
    '--quiet',
  ]


def test_tpu_vm_rejects_missing_arguments():
  out = subprocess.run(
    ['bash', str(REPO / 'launch' / 'tpu_vm.sh'), 'run', '--name', 'x', '--zone', 'z', '--dry-run'],
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert out.returncode != 0 and 'after --' in out.stderr


def test_slurm_dry_run_wires_jax_distributed(tmp_path):
  # A fake scontrol stands in for Slurm's (absent here) to resolve the head node of the allocation.
  (tmp_path / 'scontrol').write_text('#!/bin/sh\nprintf "gpu07\\ngpu08\\n"\n')
  (tmp_path / 'scontrol').chmod(0o755)
  env = {'PATH': f'{tmp_path}:{os.environ["PATH"]}', 'SLURM_JOB_NODELIST': 'gpu[07-08]'}
  export, srun = _dry_run(
    'slurm.sbatch', '--config', 'configs/sivt.py:paper', '--workdir', '/shared/runs/s', env=env
  )
  assert export == 'export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9'
  srun = shlex.split(srun)
  assert srun[:4] == ['srun', '--kill-on-bad-exit=1', 'bash', '-c']
  assert shlex.split(srun[4]) == [
    'python',
    '-m',
    'jaxad.main',
    '--coordinator_address=gpu07:12355',
    '--num_processes=$SLURM_NTASKS',
    '--process_id=$SLURM_PROCID',
    '--config',
    'configs/sivt.py:paper',
    '--workdir',
    '/shared/runs/s',
  ]
  # Outside an allocation the dry run shows how the head node is found.
  _, srun = _dry_run('slurm.sbatch', '--config', 'c.py', '--workdir', 'w', env={'SLURM_JOB_NODELIST': ''})
  assert '--coordinator_address=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):12355' in srun


def test_sweep_writes_a_slurm_array(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'jaxad.sweep',
      '--config',
      'configs/vit_memae.py:paper',
      '--sweep',
      'configs/sweeps/vit_memae_ablation.py',
      '--seeds',
      '3',
      '--executor',
      'slurm',
      '--workdir',
      str(tmp_path),
      '--sbatch=--gres=gpu:1',
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=60,
  )
  assert out.returncode == 0, out.stderr
  script = (tmp_path / 'sweep.sbatch').read_text()
  assert '#SBATCH --array=0-11' in script and '#SBATCH --gres=gpu:1' in script
  assert subprocess.run(['bash', '-n', str(tmp_path / 'sweep.sbatch')]).returncode == 0
  # Task 5 = point 5 // 3 = 1 (grid order: memory off, attention on) with seed 5 % 3 = 2.
  task = subprocess.run(
    [
      'bash',
      '-c',
      script.replace('eval "${COMMANDS[$SLURM_ARRAY_TASK_ID]}"', 'echo "${COMMANDS[$SLURM_ARRAY_TASK_ID]}"'),
    ],
    env={**os.environ, 'SLURM_ARRAY_TASK_ID': '5'},
    capture_output=True,
    text=True,
  )
  args = shlex.split(task.stdout)
  assert (
    '--config.vit_memae.use_memory=False' in args and '--config.vit_memae.use_coord_attention=True' in args
  )
  assert args[-1] == '--config.seed=2'
