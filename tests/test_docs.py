"""The documentation is checked like code: every command it shows is parsed by the real command line (or, for
the few commands of other tools, checked against what they name), the README's quick start runs end to end on real
photos, its Python block runs for real, the Python examples name only what exists, and the MkDocs site builds
with ``--strict`` (a broken link or anchor fails). A misspelt option in any page fails here."""

from __future__ import annotations

import argparse
import ast
import glob
import importlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from children import run_cli
from conftest import missing, write_dataset

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELLS = ("bash", "console", "sh", "shell")
EXTERNAL = ("curl", "ray", "tensorboard")  # other tools' commands shown in the docs: not ours to parse
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(\.[a-z]+)?$")  # MODEL, N, DIR, LABELS.csv, QUEUE.csv
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)


def fenced_blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, body, line number) of each fenced code block of ``path``."""
    text = path.read_text(encoding="utf-8")
    return [(m["lang"].lower(), m["body"], text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def shell_lines(body: str) -> list[str]:
    """The commands of a shell block: continuations joined, comments and blank lines dropped, ``$ `` prompts cut."""
    lines, pending = [], ""
    for raw in body.splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        line = line[2:] if line.startswith("$ ") else line
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def inline_spans(path: Path) -> list[str]:
    """The inline code spans of ``path`` outside fenced blocks."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text)


def shown_commands() -> list[tuple[str, str]]:
    """(where, command) of every command line in the shell blocks of the README and the docs."""
    found = []
    for page in PAGES:
        for lang, body, line in fenced_blocks(page):
            if lang in SHELLS:
                found += [(f"{page.relative_to(ROOT)}:{line}", cmd) for cmd in shell_lines(body)]
    return found


def _tolerant(parser: argparse.ArgumentParser) -> None:
    """Let a value written as a placeholder (MODEL, N) stand for any valid one; anything else is checked as the
    real parser checks it. Errors raise instead of exiting."""

    def fail(message):
        raise ValueError(message)

    parser.error = fail
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _tolerant(sub)
            continue
        if callable(action.type):
            action.type = _placeholder_or(action.type)
        if action.choices is not None:
            action.choices = _Choices(action.choices)


def _placeholder_or(real):
    def convert(value):
        return value if PLACEHOLDER.match(value) else real(value)

    convert.__name__ = getattr(real, "__name__", "value")  # argparse's message: "invalid int value"
    return convert


class _Choices(list):
    def __contains__(self, value):
        return (isinstance(value, str) and bool(PLACEHOLDER.match(value))) or list.__contains__(self, value)


@pytest.fixture(scope="module")
def cli_parser():
    from transferkit.apps import cli

    parser = cli._parser()
    _tolerant(parser)
    return parser


def subcommands(parser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def check_transferkit(parser, args: list[str]) -> str | None:
    """None when ``transferkit ARGS`` parses with the real command line, else argparse's reason."""
    try:
        parser.parse_args(args)
    except ValueError as exc:
        return str(exc)
    except SystemExit as exc:  # --help, --version
        return None if exc.code == 0 else f"exit {exc.code}"
    return None


def check_other(tokens: list[str]) -> str | None:
    """A command of another kind than ``transferkit``: None when what it names exists."""
    head = tokens[0]
    if head == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
        missing = [t for t in tokens[1:] if "=" not in t and t not in targets]
        return f"no Makefile target {missing}" if missing else None
    if head in ("python", "python3", ".venv/bin/python") and tokens[1].startswith("benchmarks/"):
        script = ROOT / tokens[1]
        if not script.is_file():
            return f"no script {tokens[1]}"
        source = script.read_text(encoding="utf-8")
        unknown = [t.split("=")[0] for t in tokens[2:] if t.startswith("--") and f'"{t.split("=")[0]}"' not in source]
        return f"{tokens[1]} has no option {unknown}" if unknown else None
    if head == "pip" and tokens[1:2] == ["install"]:
        section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
        extras = re.findall(r"^([\w-]+) = \[", section, re.M)
        for target in tokens[2:]:
            m = re.fullmatch(r"(?:\.|transferkit)\[([\w,-]+)\]", target)
            if m and not set(m[1].split(",")) <= set(extras):
                return f"no extra {m[1]} in pyproject.toml"
        return None
    if head in EXTERNAL:
        return None
    return f"a command the docs checks do not know: {head} (teach tests/test_docs.py to check it)"


def test_every_command_shown_parses_with_the_real_command_line(cli_parser):
    commands = shown_commands()
    assert sum(cmd.startswith("transferkit ") for _, cmd in commands) >= 40  # the collection found them
    bad = []
    for where, cmd in commands:
        tokens = shlex.split(cmd, comments=True)
        reason = check_transferkit(cli_parser, tokens[1:]) if tokens[0] == "transferkit" else check_other(tokens)
        if reason:
            bad.append(f"{where}: {cmd!r}: {reason}")
    assert not bad, "\n".join(bad)


def test_every_option_and_command_named_inline_exists(cli_parser):
    """Inline spans: ``transferkit CMD --opt ...`` names a real command and its real options; ``--opt`` alone
    is an option of some command."""
    subs = subcommands(cli_parser)
    every = {flag for sub in subs.values() for flag in sub._option_string_actions}
    bad = []
    for page in PAGES:
        for span in inline_spans(page):
            tokens = span.split()
            where = f"{page.relative_to(ROOT)}: `{span}`"
            if tokens[0] == "transferkit" and len(tokens) > 1:
                sub = subs.get(tokens[1])
                if sub is None:
                    bad.append(f"{where}: no command {tokens[1]!r}")
                    continue
                known = sub._option_string_actions
                bad += [f"{where}: {tokens[1]} has no {t}" for t in tokens[2:]
                        if t.startswith("-") and t.split("=")[0] not in known]
            elif re.fullmatch(r"--[a-z][\w-]*", tokens[0].split("=")[0]) and tokens[0].split("=")[0] not in every:
                bad.append(f"{where}: no command has {tokens[0]}")
    assert not bad, "\n".join(bad)


def test_a_misspelt_option_or_command_is_caught(cli_parser):
    """The checks above can fail: planted faults of each kind are found."""
    assert check_transferkit(cli_parser, shlex.split("train photos/ --test-dir test/ --out runs/fruit")) is None
    assert check_transferkit(cli_parser, shlex.split("predict MODEL new/*.jpg --top-k N --format csv")) is None
    assert "unrecognized arguments: --tset-dir" in check_transferkit(cli_parser, ["train", "photos/", "--tset-dir", "t"])
    assert "invalid choice" in check_transferkit(cli_parser, ["trian", "photos/"])
    assert "invalid choice" in check_transferkit(cli_parser, ["export", "MODEL", "--format", "onxx", "--out", "x"])
    assert "invalid int value" in check_transferkit(cli_parser, ["predict", "MODEL", "x.jpg", "--top-k", "three"])
    assert "required" in check_transferkit(cli_parser, ["export", "MODEL", "--format", "onnx"])
    assert check_other(["make", "tset"]) and check_other(["python", "benchmarks/serve.py", "M", "--colect"])
    assert check_other(["pip", "install", ".[fats]"]) and check_other(["wget", "x"])


def _resolve(dotted: str):
    """The object a dotted name ``transferkit.a.b`` names (modules imported as needed); AttributeError if none."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for part in parts[1:]:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            if not inspect.ismodule(obj):
                raise
            obj = importlib.import_module(f"{obj.__name__}.{part}")
    return obj


def _dotted(node) -> str | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(names)]) if isinstance(node, ast.Name) else None


def _python_problems(code: str, where: str) -> list[str]:
    """What a Python example names that does not exist: transferkit's attributes and modules, ImageClassifier's
    methods, and keyword arguments the function does not take."""
    from transferkit import ImageClassifier
    from transferkit.options import TrainOptions

    tree = ast.parse(code, where)
    problems, names = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transferkit"):
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute) and (_dotted(node) or "").startswith("transferkit."):
            names.append(_dotted(node))
        elif isinstance(node, ast.Call):
            func = _dotted(node.func) or ""
            if func.startswith("clf.") and not hasattr(ImageClassifier, func.split(".")[1]):
                problems.append(f"{where}: ImageClassifier has no {func.split('.')[1]}")
            target = {"ImageClassifier": ImageClassifier}.get(func) or (
                func.startswith("transferkit.") and func.count(".") == 1 and _try(_resolve, func))
            if callable(target):
                params = inspect.signature(target).parameters
                takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
                problems += [f"{where}: {func}() takes no {k.arg}=" for k in node.keywords if k.arg and
                             k.arg not in params and not (takes_any and k.arg in TrainOptions.names())]
    for name in names:
        if _try(_resolve, name) is None:
            problems.append(f"{where}: no {name}")
    return problems


def _try(fn, *args):
    try:
        return fn(*args)
    except (AttributeError, ImportError):
        return None


def test_python_examples_name_only_what_exists():
    problems, blocks = [], 0
    for page in PAGES:
        for lang, body, line in fenced_blocks(page):
            if lang == "python" and "register(BackboneSpec(" not in body:  # that one is a template
                blocks += 1
                problems += _python_problems(body, f"{page.relative_to(ROOT)}:{line}")
    assert blocks >= 8
    assert not problems, "\n".join(problems)
    planted = _python_problems("import transferkit\ntransferkit.trian('x')\nclf.fitt('x')\n"
                               "transferkit.train('x', epoch=3)\n", "planted")
    assert len(planted) == 3, planted


def test_readme_links_point_to_files_that_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert len(links) >= 10
    missing = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert not missing


def test_readme_is_one_screen_and_speaks_to_a_newcomer():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 120
    assert "make demo" in text and "make test" in text
    history = re.compile(r"\b(old default|this round|before this|issue \d|since this version)\b", re.I)
    offenders = [f"{p.relative_to(ROOT)}: {m[0]!r}" for p in PAGES for m in history.finditer(p.read_text())]
    assert not offenders


# ---------- the README's quick start, run for real ----------

def _quick_start() -> tuple[list[str], str]:
    """The shell commands and the Python block of the README's "Quick start" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = [(m["lang"], m["body"]) for m in FENCE.finditer(section)]
    shell = [shell_lines(body) for lang, body in blocks if lang in SHELLS]
    python = [body for lang, body in blocks if lang == "python"]
    assert len(shell) == 1 and len(python) == 1, "the quick start is one shell block and one Python block"
    return shell[0], python[0]


@pytest.fixture(scope="module")
def quick_start_folder(tmp_path_factory):
    """photos/<class>/, test/<class>/ (real photo crops) and new/peach.jpg, new/other.jpg: what the quick start
    names."""
    root = tmp_path_factory.mktemp("quickstart")
    write_dataset(root / "photos", 16, seed=11)
    write_dataset(root / "test", 5, seed=12)
    source = Path(write_dataset(root / "unseen", 1, seed=13))
    (root / "new").mkdir()
    shutil.copy(next((source / "grenade").glob("*.jpg")), root / "new" / "peach.jpg")
    shutil.copy(next((source / "fraise fraîche").glob("*.jpg")), root / "new" / "other.jpg")
    shutil.rmtree(source)
    return root


def _expand(tokens: list[str], cwd: Path) -> list[str]:
    out = []
    for t in tokens:
        matches = sorted(glob.glob(t, root_dir=cwd)) if any(c in t for c in "*?[") else []
        out += matches or [t]
    return out


def _serve_and_ask(args: list[str], cwd: Path, photo: str) -> dict:
    """Run the quick start's ``serve`` line (``--port 0``: the port it bound read from its log), wait for
    /healthz, GET the page, POST ``photo``, stop it."""
    from children import post_images, start_server, stop_server

    assert args[0] == "serve", args
    proc, url, log = start_server(args[1:], cwd / "serve.log", cwd=cwd, timeout=120)
    try:
        page = requests.get(url + "/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        answer = post_images(url, cwd / photo, timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.json()
    finally:
        stop_server(proc, log, timeout=30)


def test_the_readme_quick_start_runs_end_to_end(quick_start_folder, monkeypatch, capsys):
    from conftest import CLASSES

    root = quick_start_folder
    commands, python = _quick_start()
    assert [shlex.split(c)[:2] for c in commands] == [["transferkit", "train"], ["transferkit", "predict"],
                                                      ["transferkit", "serve"]]
    predicted = None
    for cmd in commands:
        args = _expand(shlex.split(cmd, comments=True), root)[1:]
        if args[0] == "serve":
            answer = _serve_and_ask(args, root, "new/peach.jpg")
            served = answer["predictions"][0]
            assert served["label"] == predicted["new/peach.jpg"]["label"]  # the server answers as predict does
            assert abs(served["probability"] - predicted["new/peach.jpg"]["probability"]) < 1e-4
            continue
        proc = run_cli(*args, cwd=root)
        if args[0] == "train":
            for name in ("model.keras", "report.html", "MODEL_CARD.md"):  # what the README's comment promises
                assert (root / "runs" / "fruit" / name).is_file(), name
            metrics = json.loads((root / "runs" / "fruit" / "metrics.json").read_text())
            assert metrics["test"]["accuracy"] >= 0.8  # 3 classes of real photos: chance is 0.33
        else:
            assert "peach.jpg" in proc.stdout and "other.jpg" in proc.stdout
            rows = json.loads(run_cli(*args, "--format", "json", cwd=root).stdout)
            predicted = {os.path.relpath(r["path"], root) if os.path.isabs(r["path"]) else r["path"]: r for r in rows}
            assert predicted["new/peach.jpg"]["label"] == "grenade"  # a crop of the grenade class's photograph
    # the Python block, as written, in the same folder (its features are cached by the command-line run)
    monkeypatch.chdir(root)
    exec(compile(python, "README.md quick start", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert all(c in printed for c in CLASSES)  # print(clf.classes_, ...)
    last = printed.strip().splitlines()[-1].split()
    assert last[0] == "new/peach.jpg" and last[1] == "grenade" and 0.0 < float(last[-1]) <= 1.0


# ---------- the site ----------

def test_the_site_builds_with_strict_links(tmp_path):
    absent = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
              if _try(importlib.util.find_spec, m) is None]
    if absent:
        missing(f"{', '.join(absent)} not installed (the [docs] extra, part of [test]: pip install -e '.[docs]')")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    api = (tmp_path / "site" / "api.html").read_text(encoding="utf-8")
    for name in ("transferkit.classifier.ImageClassifier", "transferkit.options.TrainOptions",
                 "transferkit.tasks.base.Task", "transferkit.api.train"):
        assert f'id="{name}"' in api, name  # the reference is rendered from the docstrings


# ---------- the feedback loop's commands, run for real ----------

FEEDBACK = {"README.md": "## The feedback loop", "docs/guides/feedback.md": None}  # page: its section (None: all)
PLACEHOLDERS = {"MODEL": "runs/fruit/model.keras", "DATA": "photos/", "DB": "collected.db",
                "LABELS.csv": "labels.csv", "QUEUE.csv": "runs/review/queue.csv"}
OTHER_DOMAINS = ("chelsea", "rocket")  # photos of none of the classes (a cat, a rocket)


def _feedback_commands(page: str) -> list[str]:
    """The command lines of the shell blocks of ``page``'s feedback section, in the order shown."""
    text = (ROOT / page).read_text(encoding="utf-8")
    if FEEDBACK[page]:
        text = text.split(FEEDBACK[page], 1)[1].split("\n## ", 1)[0]
    return [cmd for m in FENCE.finditer(text) if m["lang"].lower() in SHELLS for cmd in shell_lines(m["body"])]


def _uploads(root: Path) -> dict[str, tuple[str, bytes]]:
    """{content hash: (what the photo is: a class or another domain, its bytes)}: one new crop of each class and
    one photo of each other domain."""
    import hashlib

    import numpy as np
    from PIL import Image

    from photos import PHOTOS, photo_crop

    folder = Path(write_dataset(root / "uploads", 1, seed=32))
    found = [(p.parent.name, p.read_bytes()) for p in sorted(folder.rglob("*.jpg"))]
    rng = np.random.default_rng(33)
    for name in OTHER_DOMAINS:
        Image.fromarray(photo_crop(PHOTOS.index(name), rng)).save(root / f"{name}.jpg", "JPEG", quality=90)
        found.append((name, (root / f"{name}.jpg").read_bytes()))
    shutil.rmtree(folder)
    return {hashlib.sha256(data).hexdigest(): (what, data) for what, data in found}


def _serve_and_collect(args: list[str], cwd: Path, uploads: dict) -> str:
    """The documented ``serve --collect DB`` line run (``--port 0``), each upload posted once; returns the store
    once it holds one row per upload."""
    import sqlite3
    import time

    from children import start_server, stop_server

    db = cwd / args[args.index("--collect") + 1]
    proc, url, log = start_server(args[1:], cwd / "serve.log", cwd=cwd, timeout=180)
    try:
        for key, (_, data) in uploads.items():
            answer = requests.post(url + "/api/predict", files={"image": (f"{key[:8]}.jpg", data)}, timeout=60)
            assert answer.status_code == 200, answer.text
        deadline, stored = time.monotonic() + 60, 0
        while stored < len(uploads) and time.monotonic() < deadline:  # the collector writes in batches
            if db.is_file():
                with sqlite3.connect(db) as conn:
                    stored = conn.execute("select count(*) from predictions").fetchone()[0]
            time.sleep(0.2)
        assert stored == len(uploads), f"{stored} of {len(uploads)} uploads stored in {db}"
    finally:
        stop_server(proc, log, timeout=30)
    return str(db)


def _fill_queue(queue: Path, uploads: dict) -> dict[str, str]:
    """Fill queue.csv as the docs say: the first photo of a class accepted (label left empty: the model's answer),
    the others of a class given their label, the other domains labelled unknown. Returns {hash: label expected}."""
    import csv

    with open(queue, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["image"] for r in rows} == set(uploads)  # every upload in the queue, once
    expected, accepted = {}, False
    for r in rows:
        what = uploads[r["image"]][0]
        if what in OTHER_DOMAINS:
            r["label"] = expected[r["image"]] = "unknown"
        elif not accepted:
            r["accept"], accepted = "yes", True
            expected[r["image"]] = r["answer"]
        else:
            r["label"] = expected[r["image"]] = what
    with open(queue, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return expected


@pytest.mark.parametrize("page", list(FEEDBACK))
def test_the_feedback_commands_run_in_the_order_shown(page, trained, tmp_path):
    """Each command of the page's feedback block, run as written (placeholders substituted) in a folder holding
    what it names: the served model, photos/ of its classes; queue.csv filled between the two reviews."""
    import csv
    import hashlib

    from children import run_cli
    from transferkit.data.folders import split_training_folder
    from transferkit.models.modelfile import read_metadata
    from transferkit.options import TrainOptions

    commands = _feedback_commands(page)
    assert [shlex.split(c)[:2] for c in commands] == [["transferkit", k] for k in
                                                      ("serve", "review", "review", "train", "monitor")], commands
    root = tmp_path
    (root / "runs" / "fruit").mkdir(parents=True)
    shutil.copy(trained[0]["model_path"], root / "runs" / "fruit" / "model.keras")
    write_dataset(root / "photos", 6, seed=31)
    uploads = _uploads(root)
    expected, ran = None, []
    for cmd in commands:
        args = [PLACEHOLDERS.get(t, t) for t in shlex.split(cmd, comments=True)[1:]]
        ran.append(args[0])
        if args[0] == "serve":
            _serve_and_collect(args, root, uploads)
            continue
        if "--accept" in args:
            expected = _fill_queue(root / args[args.index("--accept") + 1], uploads)
        proc = run_cli(*args, cwd=root)
        if args[0] == "review" and "--out" in args:
            labels = root / args[args.index("--out") + 1]
            with open(labels, newline="", encoding="utf-8") as f:
                written = {hashlib.sha256((labels.parent / r["path"]).read_bytes()).hexdigest(): r["label"]
                           for r in csv.DictReader(f)}
            assert written == expected and f"{len(expected)} photo(s) written" in proc.stderr
        elif args[0] == "review":  # the queue the next line reads: where the docs say it is
            accept = shlex.split(commands[commands.index(cmd) + 1])
            assert (root / accept[accept.index("--accept") + 1]).is_file() and "review queue: 5 of 5" in proc.stdout
        elif args[0] == "train":
            options = TrainOptions()
            plain = split_training_folder(str(root / "photos"), options.val_split, options.seed)
            run = root / args[args.index("--out") + 1]
            n = read_metadata(str(run / "model.keras"))["data"]
            assert n["n_train"] == len(plain.train_paths) + 3 and n["n_val"] == len(plain.val_paths)
            assert "2 photo(s) labelled unknown: not a class; used as 'none of these' examples" in proc.stderr
        else:
            assert proc.stdout.startswith("inputs have")
    assert ran == ["serve", "review", "review", "train", "monitor"]
