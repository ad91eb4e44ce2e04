"""kiban's import graph in figures: what `import kiban.gateway.app` loads, and the cycles.

Modules loaded: a fresh interpreter's `python -X importtime -c 'import TARGET'`. Cycles: the
strongly connected components (more than one member) of grimp's graph of src/kiban (the graph
import-linter checks), once with every import (inside functions and TYPE_CHECKING blocks too)
and once without TYPE_CHECKING blocks; per module and per package (kiban.<first level>).

    .venv/bin/python bench/import_graph.py [--target kiban.gateway.app]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import grimp


def loaded_modules(target: str) -> list[str]:
    """Modules a fresh interpreter loads for `import target`, from `python -X importtime`."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {target}"],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    names = []
    for line in out.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        name = line.rsplit("|", 1)[1].strip()
        if name not in names:
            names.append(name)
    return names


def sccs(nodes: set[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out, key=len, reverse=True)


def package_of(module: str) -> str:
    """kiban.gateway.app -> kiban.gateway; kiban.config -> kiban.config."""
    parts = module.split(".")
    return ".".join(parts[:2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="kiban.gateway.app")
    args = p.parse_args()

    names = loaded_modules(args.target)
    ours = [n for n in names if n == "kiban" or n.startswith("kiban.")]
    print(f"`import {args.target}` loads {len(names)} modules, {len(ours)} of them kiban's:")
    for n in sorted(ours):
        print(f"  {n}")

    for label, exclude in (("all imports", False), ("without TYPE_CHECKING blocks", True)):
        graph = grimp.build_graph("kiban", exclude_type_checking_imports=exclude)
        nodes = set(graph.modules)
        edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in nodes}
        comps = sccs(nodes, edges)
        print(f"\nmodule cycles ({label}): {len(comps)} SCCs")
        for c in comps:
            print(f"  {len(c)} modules: {', '.join(c)}")
        pkgs = {package_of(m) for m in nodes}
        pedges: dict[str, set[str]] = {}
        for m, targets in edges.items():
            for t in targets:
                if package_of(t) != package_of(m):
                    pedges.setdefault(package_of(m), set()).add(package_of(t))
        pcomps = sccs(pkgs, pedges)
        print(f"package cycles ({label}): {len(pcomps)} SCCs")
        for c in pcomps:
            print(f"  {len(c)} packages: {', '.join(c)}")


if __name__ == "__main__":
    main()
