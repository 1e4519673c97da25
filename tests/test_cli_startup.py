"""`soctune --help` and `soctune list` answer without importing torch (≈ 0.2–0.3 s instead of
≈ 1.5–3 s), and the CLI's OpenMP default (GOMP_SPINCOUNT=1000 unless the user set a wait policy)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import soctune
from soctune.registry import _scan_registrations, list_builtin


def _run(script: str, env: dict[str, str] | None = None) -> dict:
    """Run ``script`` in a fresh interpreter; it prints one JSON line last."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=120, env={**base, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind, module, fn", [("process", "soctune.sde", "list_processes"),
                                              ("solver", "soctune.solvers", "list_solvers"),
                                              ("reward", "soctune.rewards", "list_rewards")])
def test_static_listing_equals_the_import_based_one(kind, module, fn):
    static = list_builtin(kind)
    assert static is not None, f"a {kind} registration is not literal: soctune list falls back to importing"
    # in a fresh interpreter: other tests register their own plug-ins (user_ou, …) in this one
    out = _run(f"""
        import json, {module} as m
        print(json.dumps(m.{fn}()))
    """)
    assert static == [tuple(row) for row in out]


def test_help_and_list_do_not_import_torch():
    out = _run("""
        import contextlib, io, json, sys
        import soctune_cli.app as cli
        seen = {"import": "torch" in sys.modules}
        for args in (["--help"], ["list"], ["list", "presets"], ["list", "rewards"], ["finetune", "--help"]):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                try:
                    cli.app(args, standalone_mode=False)
                except SystemExit:
                    pass
            seen[" ".join(args)] = "torch" in sys.modules
        print(json.dumps(seen))
    """)
    assert out == {k: False for k in out} and len(out) == 6, out


def test_installed_list_command_does_not_import_torch():
    out = _run("""
        import contextlib, io, json, sys
        from soctune_cli.app import main
        sys.argv = ["soctune", "list", "solvers"]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                main()
            except SystemExit as exc:
                code = exc.code
            else:
                code = 0
        print(json.dumps({"torch": "torch" in sys.modules, "code": code, "nabla": "nabla-db" in buf.getvalue()}))
    """)
    assert out == {"torch": False, "code": 0, "nabla": True}


def test_package_import_is_lazy():
    out = _run("""
        import json, sys
        import soctune, soctune.registry, soctune.config
        lazy = "torch" not in sys.modules
        from soctune import SoctuneError, get_process, list_processes, GradSpec, Trajectory, model_step, rollout
        print(json.dumps({"lazy": lazy, "loaded": "torch" in sys.modules,
                          "rollout": rollout.__module__, "err": SoctuneError.__module__}))
    """)
    assert out == {"lazy": True, "loaded": True, "rollout": "soctune.trajectory", "err": "soctune.registry"}


def test_every_export_resolves_and_unknown_names_fail():
    for name in ("SoctuneError", "get_process", "list_processes", "GradSpec", "Trajectory", "model_step", "rollout",
                 "finetune", "FinetuneRun", "Trainer", "TrainConfig"):
        assert name in soctune.__all__
    for name in soctune.__all__:
        assert getattr(soctune, name) is not None, name
    assert set(soctune.__all__) <= set(dir(soctune))
    ns: dict = {}
    exec("from soctune import *", ns)
    assert set(soctune.__all__) <= set(ns)
    with pytest.raises(AttributeError):
        soctune.no_such_name  # noqa: B018


def test_scanner_reads_docstrings_and_refuses_non_literals():
    src = textwrap.dedent('''
        @register_reward("b", "second")
        class B: ...
        @register_reward("a")
        class A:
            """First line.

            More."""
        register_reward("c", "plain call")(print)
    ''')
    assert _scan_registrations(src, "x.py", ("register_reward",)) == {"a": "First line.", "b": "second",
                                                                     "c": "plain call"}
    assert _scan_registrations('NAME = "x"\n@register_reward(NAME, "d")\nclass X: ...\n', "x.py",
                               ("register_reward",)) is None
    assert _scan_registrations('register_reward("x")(f)\n', "x.py", ("register_reward",)) is None


@pytest.mark.parametrize("user, expected", [
    ({}, {"policy": None, "spin": "1000"}),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, {"policy": "ACTIVE", "spin": None}),
    ({"GOMP_SPINCOUNT": "5"}, {"policy": None, "spin": "5"}),
])
def test_main_sets_a_short_spin_unless_the_user_chose(user, expected):
    out = _run("""
        import contextlib, io, json, os, sys
        from soctune_cli.app import main
        sys.argv = ["soctune", "list", "presets"]
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main()
            except SystemExit:
                pass
        print(json.dumps({"policy": os.environ.get("OMP_WAIT_POLICY"), "spin": os.environ.get("GOMP_SPINCOUNT"),
                          "threads": os.environ.get("OMP_NUM_THREADS")}))
    """, env={**user, "OMP_NUM_THREADS": "1"})
    assert out == {**expected, "threads": "1"}
