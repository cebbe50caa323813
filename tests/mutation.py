"""Mutation testing of the code that decides results: each mutant is one small change to one line
of a module (an operator, a comparison, a constant, a dropped call or keyword argument); it runs
against that module's unit tests, in a copy of the repository, and "survives" when they all pass.
The score per module and every survivor go to docs/mutation.json; docs/mutation.md says why each
survivor that is left changes nothing. Outside CI's time budget: about two hours on 2 cores.

    python tests/mutation.py                     # every module below, 2 workers
    python tests/mutation.py data/splits.py      # some modules
    python tests/mutation.py --list              # the mutants, without running them
    python tests/mutation.py --again docs/mutation.json   # only the survivors of an earlier run, again

Why not mutmut: mutmut 3 makes 2,665 mutants of these modules, most of them in strings and dict keys,
and runs about 6 a minute here (7 hours); its default fork isolation hangs once torch has computed.
These operators are the ones that change numbers, which is what these modules are for.
"""

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from engine.config import OneLineParser

FAST = ["-m", "not slow", "--deselect",  # a shell script's dry run: nothing of these modules, 16 s
        "tests/test_label_noise.py::test_table4_dry_run_lists_every_cell_and_bootstraps_from_stage_one"]
DRAWS = "tests/test_late_sam.py::test_randomized_sam_draws_depend_on_seed_and_step_only_and_have_the_asked_share"
TARGETS = {  # module -> the unit tests that hold it
    "sam.py": ["tests/test_sam.py", "tests/test_step.py", "tests/test_m_sharpness.py", "tests/test_properties.py"],
    "engine/step.py": ["tests/test_step.py", "tests/test_properties.py", "tests/test_m_sharpness.py", DRAWS],
    "engine/groups.py": ["tests/test_m_sharpness.py", "tests/test_properties.py"],
    "data/augment.py": ["tests/test_data.py", "tests/test_properties.py", "tests/test_label_noise.py"],
    "data/loaders.py": ["tests/test_data.py", "tests/test_properties.py", "tests/test_autoaugment.py",
                        "tests/test_label_noise.py"],
    "data/splits.py": ["tests/test_data.py", "tests/test_label_noise.py", "tests/test_properties.py"],
    "models/__init__.py": ["tests/test_models.py", "tests/test_label_noise.py", "tests/test_properties.py"],
    "models/init.py": ["tests/test_models.py", "tests/test_properties.py"],
    "models/resnet.py": ["tests/test_models.py", "tests/test_label_noise.py", "tests/test_properties.py"],
    "models/wide_resnet.py": ["tests/test_models.py", "tests/test_properties.py"],
}
BINARY = {ast.Add: "-", ast.Sub: "+", ast.Mult: "/", ast.Div: "*", ast.Pow: "*", ast.FloorDiv: "/", ast.Mod: "//"}
COMPARE = {ast.Lt: "<=", ast.LtE: "<", ast.Gt: ">=", ast.GtE: ">", ast.Eq: "!=", ast.NotEq: "==",
           ast.In: "not in", ast.NotIn: "in", ast.Is: "is not", ast.IsNot: "is"}
SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.FloorDiv: "//", ast.Mod: "%",
          ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in",
          ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.And: "and", ast.Or: "or"}


class Mutant:
    def __init__(self, module, line, what, start, end, text, col=0):
        self.module, self.line, self.what, self.span, self.text = module, line, what, (start, end), text
        self.col = col  # where on its line: two mutants of one kind on one line stay apart

    def key(self):
        return self.module, self.line, self.what, self.col

    def apply(self, source):
        (start, end) = self.span
        return source[:start] + self.text + source[end:]


def offset(lines, lineno, col):
    """The character offset of (lineno, col) in the source (lineno from 1, col in UTF-8 bytes)."""
    return sum(len(line) for line in lines[:lineno - 1]) + len(lines[lineno - 1].encode()[:col].decode())


def mutants(module):
    source = (REPO / module).read_text()
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    skipped = set()  # nodes inside raise statements, docstrings and `if __name__` blocks: messages, not numbers
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) or (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            skipped.update(id(n) for n in ast.walk(node))
    out = []

    def between(a, b, token, replacement, node, what):
        """Replace `token` in the text between the end of node a and the start of node b."""
        start, end = offset(lines, a.end_lineno, a.end_col_offset), offset(lines, b.lineno, b.col_offset)
        gap = source[start:end]
        at = gap.find(token)
        if at >= 0 and "#" not in gap[:at]:
            out.append(Mutant(module, node.lineno, what, start + at, start + at + len(token), replacement))

    for node in ast.walk(tree):
        if id(node) in skipped or not hasattr(node, "lineno"):
            continue
        span = (offset(lines, node.lineno, node.col_offset), offset(lines, node.end_lineno, node.end_col_offset))
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            op = SYMBOL[type(node.op)]
            between(node.left, node.right, op, BINARY[type(node.op)], node, f"{op} -> {BINARY[type(node.op)]}")
        elif isinstance(node, ast.AugAssign) and type(node.op) in BINARY:
            op = SYMBOL[type(node.op)] + "="
            between(node.target, node.value, op, BINARY[type(node.op)] + "=", node, f"{op} -> {BINARY[type(node.op)]}=")
        elif isinstance(node, ast.Compare):
            for left, op, right in zip([node.left, *node.comparators], node.ops, node.comparators):
                if type(op) in COMPARE:
                    between(left, right, SYMBOL[type(op)], COMPARE[type(op)], node,
                            f"{SYMBOL[type(op)]} -> {COMPARE[type(op)]}")
        elif isinstance(node, ast.BoolOp):
            other = "or" if isinstance(node.op, ast.And) else "and"
            between(node.values[0], node.values[1], SYMBOL[type(node.op)], other, node, f"{SYMBOL[type(node.op)]} -> {other}")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            out.append(Mutant(module, node.lineno, f"drop {'not' if isinstance(node.op, ast.Not) else 'minus'}",
                              *span, ast.get_source_segment(source, node.operand)))
        elif isinstance(node, ast.Constant) and not isinstance(node.value, str) and node.value is not None:
            value = node.value
            if isinstance(value, bool):
                new = repr(not value)
            elif isinstance(value, int):
                new = repr(value + 1)
            elif isinstance(value, float):
                new = repr(value * 2 if value else 1.0)
            else:
                continue
            out.append(Mutant(module, node.lineno, f"{ast.get_source_segment(source, node)} -> {new}", *span, new))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            out.append(Mutant(module, node.lineno, f"drop the call {ast.get_source_segment(source, node.value.func)}()",
                              *span, "pass"))
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg is None:
                    continue
                start = offset(lines, keyword.lineno, keyword.col_offset)
                end = offset(lines, keyword.end_lineno, keyword.end_col_offset)
                tail = source[end:]
                stripped = len(tail) - len(tail.lstrip())
                if tail.lstrip().startswith(","):
                    end += stripped + 1
                else:  # the last argument: take the comma before it instead
                    head = source[:start].rstrip()
                    if head.endswith(","):
                        start = len(head) - 1
                out.append(Mutant(module, keyword.lineno, f"drop {keyword.arg}=", start, end, ""))
    keep = []
    for m in out:  # only mutants that still parse (a dropped keyword can leave a bare call)
        try:
            ast.parse(m.apply(source))
        except SyntaxError:
            continue
        m.col = m.span[0] - source.rfind("\n", 0, m.span[0]) - 1
        keep.append(m)
    return keep


def key(record):
    return record["module"], record["line"], record["mutation"], record.get("col")


def matches(mutant, keys):
    """Whether a mutant is one of these records (a record without a column names every mutant of its kind
    on its line)."""
    return mutant.key() in keys or (mutant.module, mutant.line, mutant.what, None) in keys


def run(mutant, copy, timeout):
    """-> "killed", "survived" or "timeout"."""
    path = copy / mutant.module
    original = path.read_text()
    path.write_text(mutant.apply(original))
    try:
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *FAST,
                                 *TARGETS[mutant.module]], cwd=copy, env=env, capture_output=True, timeout=timeout)
        return "survived" if result.returncode == 0 else "killed"
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:
        path.write_text(original)


def workspace():
    """A copy of the repository's code and tests (no data, no runs), without bytecode caches."""
    copy = Path(tempfile.mkdtemp(prefix="mutation-"))
    for entry in REPO.iterdir():
        if entry.name in (".git", "runs", "wandb") or entry.name.startswith("."):
            continue
        (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, copy / entry.name,
                                                              **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                                 if entry.is_dir() else {}))
    return copy


def main(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modules", nargs="*", default=list(TARGETS), help="modules to mutate (default: all)")
    p.add_argument("--list", action="store_true", help="print the mutants and stop")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "docs" / "mutation.json"))
    p.add_argument("--again", metavar="JSON", help="run only the mutants that survived in this earlier result; "
                                                   "the others keep their outcome")
    args = p.parse_args(argv)
    unknown = [m for m in args.modules if m not in TARGETS]
    if unknown:
        p.error(f"no tests listed for {unknown[0]}; one of: {', '.join(TARGETS)}")
    if args.again and not Path(args.again).is_file():
        p.error(f"--again {args.again}: no such file; give the JSON an earlier run wrote (--out)")
    todo = [m for module in args.modules for m in mutants(module)]
    earlier, others = [], []
    if args.again:
        records = json.loads(Path(args.again).read_text())["mutants"]
        earlier = [r for r in records if r["module"] in args.modules]
        others = [r for r in records if r["module"] not in args.modules]  # kept as they were
        survivors = {key(r) for r in earlier if r["outcome"] == "survived"}
        known = {key(r) for r in earlier}
        now = {m.key() for m in todo}  # records of lines that moved or went are dropped (their mutants rerun)
        fresh = [m for m in todo if not matches(m, known)]  # mutants the code has gained since
        todo = [m for m in todo if matches(m, survivors)] + fresh
        earlier = [r for r in earlier if r["outcome"] != "survived" and key(r) in now]
    if args.list:
        for m in todo:
            print(f"{m.module}:{m.line}: {m.what}")
        print(f"{len(todo)} mutants")
        return 0
    copies = [workspace() for _ in range(args.workers)]
    baseline = {}
    for module in dict.fromkeys(m.module for m in todo):  # the unmutated tests must pass, and set the timeout
        start = time.monotonic()
        ok = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FAST, *TARGETS[module]],
                            cwd=copies[0], env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"},
                            capture_output=True).returncode == 0
        if not ok:
            print(f"error: the tests of {module} fail without any mutation; fix them first", file=sys.stderr)
            return 2
        baseline[module] = time.monotonic() - start
    results = []

    def work(index):
        copy = copies[index % len(copies)]
        out = []
        for m in todo[index::len(copies)]:
            outcome = run(m, copy, timeout=3 * baseline[m.module] + 30)
            out.append({"module": m.module, "line": m.line, "col": m.col, "mutation": m.what, "outcome": outcome})
            print(f"{outcome:8s} {m.module}:{m.line}: {m.what}", flush=True)
        return out

    with ThreadPoolExecutor(len(copies)) as pool:
        for part in pool.map(work, range(len(copies))):
            results += part
    results += earlier + others
    for copy in copies:
        shutil.rmtree(copy, ignore_errors=True)
    results.sort(key=lambda r: (r["module"], r["line"], r["mutation"]))
    score = {}
    for module in dict.fromkeys(r["module"] for r in results):
        rows = [r for r in results if r["module"] == module]
        killed = sum(r["outcome"] in ("killed", "timeout") for r in rows)
        score[module] = {"mutants": len(rows), "killed": killed, "survived": len(rows) - killed,
                         "percent_killed": round(100 * killed / len(rows), 1)}
    Path(args.out).write_text(json.dumps({"tests": TARGETS, "score": score, "mutants": results}, indent=1) + "\n")
    for module, s in score.items():
        print(f"{module:24s} {s['killed']:4d}/{s['mutants']:<4d} killed ({s['percent_killed']}%)")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
