#!/usr/bin/env python3
"""Turn the kernel lab's console logs into results.json and a table (qemu-scripts/kernel-lab.sh).

Usage: report.py PLAN.json OUT_DIR
PLAN.json (written by kernel-lab.sh) names the scenarios, and per kernel its package, the release
it must boot, its console log and how the VM ran. Writes OUT_DIR/results.json and
OUT_DIR/table.txt, prints the table and the failures' output, and exits 0 only when every
scenario ran and passed on every kernel, each kernel booted the release asked for and finished.
The markers are described in qemu-scripts/kernel-lab/init.sh.
"""

import json
import re
import sys

MARK = re.compile(r"VUT-KLAB-[A-Z-]+(?: |$).*")


def markers(path):
    """(marker, rest) for each marker line; a kernel message may precede a marker on its line."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().replace("\r", "").split("\n")
    except OSError:
        return []
    out = []
    for line in lines:
        m = MARK.search(line)
        if m:
            text = m.group(0)
            name, _, rest = text.partition(" ")
            out.append((name, rest))
    return out


def crash_lines(path, limit=12):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().replace("\r", "").split("\n")
    except OSError:
        return []
    for i, line in enumerate(lines):
        if re.search(r"Oops|Kernel panic|BUG:|general protection|Call Trace", line):
            return lines[i : i + limit]
    return []


def kernel_result(k, scenarios):
    ms = markers(k["console"])
    r = {
        "kernel": k["name"],
        "package": k["package"],
        "package_version": k["package_version"],
        "expected_release": k["release"],
        "booted_release": None,
        "vm_attempts": k["vm_attempts"],
        "vm_seconds": k["vm_seconds"],
        "vm_exit_status": k["vm_status"],
        "crashes_before_tests": k.get("crashes", []),
        "tests_started": False,
        "finished": False,
        "modules": {},
        "daemon_startup": [],
        "kmsg": [],
        "errors": [],
    }
    results, outputs, seconds = {}, {}, {}
    for name, rest in ms:
        if name == "VUT-KLAB-BOOT":
            m = re.match(r"kernel=(\S+)", rest)
            r["booted_release"] = m.group(1) if m else rest
        elif name == "VUT-KLAB-MODULE":
            mod, _, status = rest.partition(" ")
            r["modules"][mod] = status
        elif name == "VUT-KLAB-DAEMON":
            r["daemon_startup"].append(rest)
        elif name == "VUT-KLAB-SYSCTL":
            r.setdefault("sysctl", []).append(rest)
        elif name == "VUT-KLAB-TESTS-START":
            r["tests_started"] = True
        elif name == "VUT-KLAB-RESULT":
            m = re.match(r"test (\S+) \.\.\. (\S+)(.*)", rest)
            if m:
                results[m.group(1)] = (m.group(2), m.group(3).strip())
        elif name == "VUT-KLAB-OUT":
            test, _, line = rest.partition("| ")
            outputs.setdefault(test, []).append(line)
        elif name == "VUT-KLAB-TEST-END":
            m = re.match(r"(\S+) rc=(-?\d+) ms=(\d+)", rest)
            if m:
                seconds[m.group(1)] = int(m.group(3)) / 1000
        elif name == "VUT-KLAB-KMSG":
            r["kmsg"].append(rest)
        elif name == "VUT-KLAB-ERROR":
            r["errors"].append(rest)
        elif name == "VUT-KLAB-DONE":
            r["finished"] = True
    r["release_matches"] = r["booted_release"] == k["release"]
    r["scenarios"] = []
    for s in scenarios:
        status, detail = results.get(s["test"], ("not run", ""))
        r["scenarios"].append(
            {
                "label": s["label"],
                "test": s["test"],
                "result": status,
                "detail": detail,
                "seconds": seconds.get(s["test"]),
                "output": "\n".join(outputs.get(s["test"], [])),
            }
        )
    if not r["finished"]:
        r["crash"] = crash_lines(k["console"])
    r["passed"] = (
        r["release_matches"]
        and r["finished"]
        and all(s["result"] == "ok" for s in r["scenarios"])
    )
    return r


def excerpt(output, limit=30):
    """The interesting part of a failed test's output: its captured stdout section, panic first."""
    lines = output.split("\n")
    for i, line in enumerate(lines):
        if "panicked at" in line:
            return lines[i : i + limit]
    return lines[-limit:]


def main():
    plan_path, out_dir = sys.argv[1], sys.argv[2]
    with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
    kernels = [kernel_result(k, plan["scenarios"]) for k in plan["kernels"]]
    results = {
        "passed": all(k["passed"] for k in kernels) and bool(kernels),
        "quick": plan["quick"],
        "qemu": plan["qemu"],
        "env": plan["env"],
        "daemon_args": plan["daemon_args"],
        "scenarios": plan["scenarios"],
        "kernels": kernels,
    }
    with open(f"{out_dir}/results.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
        f.write("\n")

    table = []
    width = max(len(s["label"]) for s in plan["scenarios"]) + 2
    # Each kernel's column is as wide as its release.
    cols = [max(13, len(k["booted_release"] or "") + 2) for k in kernels]
    head = "scenario".ljust(width) + "".join(k["kernel"].rjust(c) for k, c in zip(kernels, cols))
    table.append(head)
    for i, s in enumerate(plan["scenarios"]):
        row = s["label"].ljust(width)
        for k, c in zip(kernels, cols):
            sc = k["scenarios"][i]
            cell = sc["result"]
            if sc["seconds"] is not None and sc["result"] != "not run":
                cell += f" {sc['seconds']:.0f}s"
            row += cell.rjust(c)
        table.append(row)
    table.append(
        "booted".ljust(width)
        + "".join((k["booted_release"] or "-").rjust(c) for k, c in zip(kernels, cols))
    )
    table.append(
        "VM".ljust(width)
        + "".join(
            f"{k['vm_seconds']}s x{k['vm_attempts']}{'' if k['finished'] else ' !'}".rjust(c)
            for k, c in zip(kernels, cols)
        )
    )
    table.append("")
    for s in plan["scenarios"]:
        table.append(f"{s['label']}: {s['test']}")
    if plan["daemon_args"].strip():
        table.append(f"(every scenario's daemon ran with {plan['daemon_args'].strip()})")
    text = "\n".join(table)

    notes = []
    for k in kernels:
        if not k["release_matches"]:
            notes.append(
                f"{k['kernel']}: booted {k['booted_release']!r}, expected {k['expected_release']!r}"
            )
        if not k["finished"]:
            notes.append(
                f"{k['kernel']}: the VM did not finish (exit status {k['vm_exit_status']}); "
                "remaining scenarios did not run"
            )
            notes.extend(f"    {line}" for line in k.get("crash", []))
        for c in k["crashes_before_tests"]:
            notes.append(f"{k['kernel']}: crashed before the tests started, VM run again: {c}")
        for e in k["errors"]:
            notes.append(f"{k['kernel']}: {e}")
        for mod, status in k["modules"].items():
            if status != "ok":
                notes.append(f"{k['kernel']}: module {mod}: {status}")
        for s in k["scenarios"]:
            if s["result"] == "ok":
                continue
            if s["result"] == "not run":
                why = (
                    "not in the test binary"
                    if k["finished"] and k["tests_started"]
                    else "the VM ended first"
                )
                notes.append(f"{k['kernel']}: {s['label']} ({s['test']}) did not run: {why}")
                continue
            notes.append(f"{k['kernel']}: {s['label']} ({s['test']}) {s['result']} {s['detail']}")
            notes.extend(f"    {line}" for line in excerpt(s["output"]))
    if notes:
        text += "\n\n" + "\n".join(notes)
    with open(f"{out_dir}/table.txt", "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
