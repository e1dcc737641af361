"""Deployment benchmark: per-round wall time over loopback against the simulation, same config.

Writes the ``deployment`` section of ``docs/benchmarks.md``. One run measures, side by side:

* **deployment**: ``fedmeta deploy-local`` (:func:`fedmeta.flower.deploy.local.run_local`): a SuperLink and
  one SuperNode per site on 127.0.0.1 with TLS and SuperNode authentication, each site reading its
  own folder (written by ``make-data``), the server holding no data;
* **simulation**: ``fedmeta simulate`` of the same deployment config over the same site folders
  (client ``c`` reads site ``c``), in Flower's simulation engine;
* **centralized**: the same math in one process (``fedmeta centralized``), for scale.

Per-round time is each ``metrics.jsonl`` row's ``seconds`` (send, wait for the replies,
aggregate, checkpoint: the round as the server lives it); start-up (processes, start-up query)
is reported apart. The final meta-parameters of the three are compared as a sanity check: they
compute the same thing.

Usage::

    python -m simulations.bench_deployment                     # 3 sites, 5 rounds (~5 minutes on 2 cores)
    python -m simulations.bench_deployment --sites 5 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedmeta.centralized import run_centralized
from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import Config, load_config
from fedmeta.flower.deploy.local import deployment_config, prepare_sites, run_local
from fedmeta.flower.env import configure_environment
from fedmeta.flower.simulation import quiet_flower_logs, simulate
from fedmeta.outputs import read_metrics
from simulations.report import machine_line, save_record, update_section

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_deployment")


def _round_seconds(out: Path) -> list[float]:
    return [float(r["seconds"]) for r in read_metrics(out / "metrics.jsonl") if "train" in r and "seconds" in r]


def _max_diff(a: Path, b: Path) -> float:
    pa, pb = load_checkpoint(a / "checkpoint.pt")["meta_params"], load_checkpoint(b / "checkpoint.pt")["meta_params"]
    return max(float((pa[k].double() - pb[k].double()).abs().max()) for k in pa)


def _row(name: str, startup: float | None, rounds: list[float], wall: float, final: dict[str, Any]) -> dict[str, Any]:
    return {
        "mode": name,
        "startup_seconds": startup,
        "round_median": statistics.median(rounds),
        "round_min": min(rounds),
        "round_max": max(rounds),
        "rounds": len(rounds),
        "wall_seconds": wall,
        "post_adapt_loss": final.get("post_adapt_loss"),
    }


def measure(cfg: Config, sites: int, work: Path) -> dict[str, Any]:
    """Run the three paths on ``cfg`` with ``sites`` sites and return the measurements."""
    site_dirs = prepare_sites(cfg, sites, work / "sites")
    dcfg = deployment_config(cfg, sites)
    results: dict[str, Any] = {"sites": sites, "rounds": cfg.federation.rounds, "config": "configs/sinusoid.yaml"}

    log.info("deployment: %d sites, %d rounds", sites, cfg.federation.rounds)
    t0 = time.perf_counter()
    dep = run_local(cfg, work / "deployment", data=site_dirs[0].parent, sites=sites)
    dep_wall = time.perf_counter() - t0
    d = dep.summary
    startup = d["deployment"]["startup_seconds"] + d["federation"].get("discovery_seconds", 0.0)
    results["deployment"] = _row(
        "deployment (TLS + node auth)", startup, _round_seconds(work / "deployment"), dep_wall, d["final"]
    )
    results["deployment"]["processes_seconds"] = d["deployment"]["startup_seconds"]
    results["deployment"]["discovery_seconds"] = d["federation"].get("discovery_seconds")

    # the same config over the same folders, in Flower's simulation engine
    scfg = replace(dcfg, task=replace(dcfg.task, data_dir=str(site_dirs[0].parent)))
    log.info("simulation")
    t0 = time.perf_counter()
    s = simulate(scfg, work / "simulation", num_cpus=2)
    sim_wall = time.perf_counter() - t0
    rounds = _round_seconds(work / "simulation")
    results["simulation"] = _row("simulation (Ray)", sim_wall - sum(rounds), rounds, sim_wall, s["final"])
    results["simulation"]["discovery_seconds"] = s["federation"].get("discovery_seconds")

    ccfg = replace(scfg, eval=replace(scfg.eval, server=True, clients=0))
    t0 = time.perf_counter()
    c = run_centralized(ccfg, work / "centralized")
    cen_wall = time.perf_counter() - t0
    results["centralized"] = _row(
        "centralized (one process)", None, _round_seconds(work / "centralized"), cen_wall, c["final"]
    )

    results["max_abs_diff"] = {
        "deployment_vs_simulation": _max_diff(work / "deployment", work / "simulation"),
        "deployment_vs_centralized": _max_diff(work / "deployment", work / "centralized"),
    }
    results["ratio_round_deployment_over_simulation"] = (
        results["deployment"]["round_median"] / results["simulation"]["round_median"]
    )
    return results


def render(res: dict[str, Any], command: str) -> str:
    """The markdown section."""
    lines = [
        "## Deployment over loopback vs simulation",
        "",
        f"Written by `{command}` ({machine_line()})."
        + (
            f" Load average at the end of the measurement: {res['load_average'][0]:.1f}."
            if res.get("load_average")
            else ""
        ),
        "",
        f"`{res['config']}` (MAML, 5 tasks per client and round) as a deployment of {res['sites']} sites "
        f"(`fedmeta deploy-local`: SuperLink + {res['sites']} SuperNodes on 127.0.0.1, TLS, node authentication, "
        f"each site reading its own `make-data` folder, the server holding no data), {res['rounds']} rounds, against "
        "`fedmeta simulate` of the same config over the same folders and the centralized reference, one after the "
        "other in one run. A round's time is the server's: send, wait for every reply, aggregate, checkpoint. The "
        "wall time is everything: processes (or Ray) starting, the start-up query, the rounds, the final federated "
        "evaluation, the outputs.",
        "",
        "| path | per-round s (median) | min – max | rounds | start-up query s | wall s | held-out post-adapt MSE |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in ("deployment", "simulation", "centralized"):
        r = res[key]
        query = "–" if r.get("discovery_seconds") is None else f"{r['discovery_seconds']:.1f}"
        loss = "–" if r["post_adapt_loss"] is None else f"{r['post_adapt_loss']:.4f}"
        lines.append(
            f"| {r['mode']} | {r['round_median']:.2f} | {r['round_min']:.2f} – {r['round_max']:.2f} | "
            f"{r['rounds']} | {query} | {r['wall_seconds']:.1f} | {loss} |"
        )
    d = res["deployment"]
    lines += [
        "",
        f"A deployment round takes **{res['ratio_round_deployment_over_simulation']:.0f}×** a simulated round here "
        f"(medians). Starting the deployment's processes (SuperLink, key registration, {res['sites']} SuperNodes "
        f"online) took {d['processes_seconds']:.1f} s before the run was submitted. Where a deployment round's time "
        "goes: SuperNodes and the ServerApp poll the SuperLink every 3 s (fixed in Flower 1.41), and every message "
        "starts a fresh `flwr-clientapp` process that imports torch and fedmeta before computing a few milliseconds "
        "of MAML; the simulation keeps warm Ray actors and an in-memory message store.",
        "",
        f"Sanity: largest difference between final meta-parameters, deployment vs simulation "
        f"{res['max_abs_diff']['deployment_vs_simulation']:.1e}, deployment vs centralized "
        f"{res['max_abs_diff']['deployment_vs_centralized']:.1e} (the same tasks from the same seeds). The "
        "post-adaptation MSE of the federated paths is measured by the sites on their own held-out tasks (the same "
        "draws on both); the centralized reference evaluates other draws from the same sites' held-out tasks on the "
        "server.",
    ]
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, measure, write the section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the measurements to this file")
    parser.add_argument(
        "--render", default=None, metavar="JSON", help="only rewrite the section from measurements saved with --json"
    )
    args = parser.parse_args()
    configure_environment()  # before anything imports flwr
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_flower_logs()
    if args.render:
        res = json.loads(Path(args.render).read_text(encoding="utf-8"))
    else:
        cfg = load_config(
            REPO / "configs" / "sinusoid.yaml",
            [
                f"federation.rounds={args.rounds}",
                f"eval.every={args.rounds}",
                "eval.tasks=60",
                "federation.round_timeout=120",
            ],
        )
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-deployment-"))
        res = measure(cfg, args.sites, work)
        res["load_average"] = list(__import__("os").getloadavg())
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2), encoding="utf-8")
    command = (
        "python -m simulations.bench_deployment"
        + (f" --sites {args.sites}" if args.sites != 3 else "")
        + (f" --rounds {args.rounds}" if args.rounds != 5 else "")
    )
    save_record("deployment", "deployment", res)  # the raw record the section is rendered from (committed)
    path = update_section("deployment", render(res, command))
    log.info("wrote the deployment section of %s", path)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
