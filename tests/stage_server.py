"""Runs stage scripts for the tests in forked children of one process that imported torch once.

A stage run as ``python stages/X.py`` spends about 5 s of a 2-core CI machine importing torch,
torchvision, timm and accelerate before it does anything; the suite runs well over a hundred of
them. This server imports those libraries once (running no torch op, so no thread pool exists yet)
and forks a child per request. The child is a fresh process for everything the stage does: its own
argv, environment, working directory, stdout/stderr files and exit status (a SIGKILL from a
failpoint shows as -9, as with a subprocess). The stage's own code, ``pipeline`` included, is
imported in the child, so it is the code on disk at that moment.

Protocol, one JSON line each way: request ``{"argv", "env", "cwd", "stdout", "stderr"}``;
replies ``{"pid": ...}`` at the fork, then ``{"rc": ...}`` when the child has ended.
"""

from __future__ import annotations

import json
import os
import sys


def _child(req: dict) -> None:
    """Become the stage process of ``req``; never returns."""
    code = 1
    try:
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        script = req["argv"][0]
        sys.argv = list(req["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script` sets it
        import atexit
        import runpy
        import traceback

        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()  # what interpreter shutdown does: logging, accelerate, tempfiles
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    import accelerate  # noqa: F401
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import safetensors.torch  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401
    import webdataset  # noqa: F401
    import yaml  # noqa: F401

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # nothing the server prints can corrupt the protocol
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            replies.close()
            _child(req)
        print(json.dumps({"pid": pid}), file=replies, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), file=replies, flush=True)


if __name__ == "__main__":
    main()
