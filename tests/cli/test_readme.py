"""Every command in README.md runs as written.

The README's fenced code blocks are extracted and run:

* ``python`` blocks: one subprocess runs them all in README order, each `exec`'d in a fresh namespace
  (one interpreter, so torch and timm are imported once), in a shared scratch directory;
* ``bash`` blocks: each through ``bash -e -o pipefail`` in the same directory, in README order (a block may
  use what an earlier one wrote), with an ``esta`` command on PATH (``python -m esta`` of this checkout,
  what ``pip install`` puts there) and this interpreter's environment first on PATH (``python3``);
* ``text`` blocks are output or formulas, not commands: counted, not run.

A block is excluded only by an explicit, visible marker on the line right before it::

    <!-- docs-check: skip (the reason) -->

Any other block (no language, another language, or a marked block that is not skipped) fails the test.

Two reductions, both for time: ``esta serve`` blocks get a free port in place of 8000 (another process may
hold 8000), and the demo run they serve (``esta-demo``) is made once beforehand by ``esta demo --out
esta-demo --epochs 1 --no-progress`` (the README's ``make demo`` trains 20 epochs: minutes).

Also checked: the README stays within its budget of 250 lines, and its relative links point to files that
exist (except the pages other branches are adding, listed in ``PENDING_PAGES``).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_LINES = 250
RUN_LANGS = ("python", "bash")
SKIP = re.compile(r"^<!--\s*docs-check:\s*skip\s*\((.+)\)\s*-->$")
MARKER = re.compile(r"<!--\s*docs-check")
# linked from the README, written on other branches; a dangling link to any other file fails
PENDING_PAGES: set = set()
BLOCK_TIMEOUT_S = 600


def readme_blocks(text: str):
    """[(line number of the opening fence, language, code, skip reason or None)] for every fenced block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if j == len(lines):
            raise AssertionError(f"README.md:{start + 1}: unclosed code block")
        prev = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        skip = SKIP.match(prev)
        if MARKER.search(prev) and not skip:
            raise AssertionError(f"README.md:{start}: unknown docs-check marker {prev!r}")
        blocks.append((start + 1, lang, "\n".join(lines[start + 1:j]) + "\n", skip.group(1) if skip else None))
        i = j + 1
    return blocks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RUNNER = textwrap.dedent("""
    import json, os, sys, time, traceback
    blocks = json.load(open(sys.argv[1]))
    failed = []
    for line, code in blocks:
        t0 = time.time()
        try:
            exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__main__"})
        except BaseException:
            traceback.print_exc()
            failed.append(line)
        print(f"[docs-check] README.md:{line} python: {'FAILED' if line in failed else 'ok'}, "
              f"{time.time() - t0:.0f} s", flush=True)
    if failed or sys.argv[2] != "demo":
        sys.exit(1 if failed else 0)
    t0 = time.time()
    from esta.cli import main
    rc = main(["demo", "--out", "esta-demo", "--epochs", "1", "--no-progress"])
    print(f"[docs-check] fixture for esta serve: esta demo --out esta-demo --epochs 1: status {rc}, "
          f"{time.time() - t0:.0f} s", flush=True)
    sys.exit(3 if rc else 0)
""")



def test_readme_within_budget_and_links_resolve():
    text = README.read_text()
    n = len(text.splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; the budget is {MAX_LINES} (move details to docs/)"
    dangling = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        if not (ROOT / target).exists() and target not in PENDING_PAGES:
            dangling.append(target)
    assert not dangling, f"README.md links to missing files: {dangling}"


def test_readme_blocks_run(tmp_path):
    blocks = readme_blocks(README.read_text())
    unrunnable = [(line, lang) for line, lang, _, skip in blocks
                  if skip is None and lang not in RUN_LANGS + ("text",)]
    assert not unrunnable, (f"README blocks with no runnable language and no docs-check skip marker "
                            f"(line, language): {unrunnable}")
    python = [(line, code) for line, lang, code, skip in blocks if lang == "python" and skip is None]
    shell = [(line, code) for line, lang, code, skip in blocks if lang == "bash" and skip is None]
    skipped = [(line, skip) for line, _, _, skip in blocks if skip is not None]
    text_blocks = [line for line, lang, _, skip in blocks if lang == "text" and skip is None]
    print(f"\nREADME.md: {len(blocks)} code blocks: {len(python)} python and {len(shell)} bash run, "
          f"{len(text_blocks)} text (output, not commands), {len(skipped)} skipped:")
    for line, reason in skipped:
        print(f"  skipped README.md:{line}: {reason}")

    work = tmp_path / "work"
    work.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "esta"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m esta "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bindir), str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["MPLBACKEND"] = "Agg"
    # one thread: on a busy 2-core machine two OpenMP threads mostly wait for each other (measured: the demo
    # fixture took 35 s of CPU with one thread, 206 s with two, at a load average of 14)
    env["OMP_NUM_THREADS"] = "1"

    # every python block, then the demo run the serve block uses (fixture), in one interpreter
    spec = tmp_path / "python_blocks.json"
    spec.write_text(json.dumps(python))
    fixture = "demo" if any("esta-demo" in code for _, code in shell) else "none"
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(spec), fixture], cwd=work, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=BLOCK_TIMEOUT_S)
    print("\n".join(l for l in proc.stdout.splitlines() if l.startswith("[docs-check]")))
    assert proc.returncode == 0, f"README python blocks failed:\n{proc.stdout[-6000:]}"

    groups = []
    try:
        for line, code in shell:
            if "esta serve" in code:
                port = str(_free_port())
                code = re.sub(r"\b8000\b", port, code)
            log = tmp_path / f"bash-{line}.log"
            with open(log, "w") as f:  # a file, not a pipe: a server left in the background cannot hold it open
                p = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", code], cwd=work, env=env, text=True,
                                     stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
                groups.append(p.pid)
                try:
                    p.wait(timeout=BLOCK_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            out = log.read_text()
            print(f"[docs-check] README.md:{line} bash: {'ok' if p.returncode == 0 else 'FAILED'}")
            assert p.returncode == 0, f"README.md:{line}: the bash block failed ({p.returncode}):\n{code}\n{out[-6000:]}"
            print("\n".join("    " + l for l in out.splitlines()[-4:]))
    finally:
        for pgid in groups:  # a server a block left running in the background, by its own process group
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
