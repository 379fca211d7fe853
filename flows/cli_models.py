"""The commands on registered edge models: lineage, verify, dossier, promote, approve, rollback (predict: cli_predict)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from flows.cli_common import ConfigOpt, SetOpt, fail, load_cfg, app, console, err_console

TrackingOpt = typer.Option("sqlite:///.distill/mlflow.db", "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                           help="the MLflow registry holding the model")


class _Branch:
    """A tree printed line by line (rich's Tree crops long lines; digests must stay whole)."""

    def __init__(self, text: str):
        self.text, self.children = text, []

    def add(self, text: str, **_) -> "_Branch":
        self.children.append(_Branch(text))
        return self.children[-1]

    def lines(self, prefix: str = "") -> list[str]:
        out = [self.text] if not prefix else []
        for i, child in enumerate(self.children):
            last = i == len(self.children) - 1
            out.append(f"{prefix}{'└── ' if last else '├── '}{child.text}")
            out += child.lines(prefix + ("    " if last else "│   "))
        return out


@app.command()
def lineage(model: str = typer.Argument(..., help="models:/<name>-edge@champion or models:/<name>-edge/3"),
            tracking_uri: str = TrackingOpt,
            mlflow_ui: str = typer.Option("http://127.0.0.1:5000", help="MLflow UI base URL for the links"),
            as_json: bool = typer.Option(False, "--json", help="print the chain as JSON")):
    """Print the chain edge -> student -> soft labels -> teacher version -> data digests, with runs and links."""
    from distill_gap.errors import DistillError
    from distill_gap.governance.lineage import lineage as build
    from distill_gap.registry.model_uri import registry_client

    try:
        info = build(registry_client(tracking_uri), model, mlflow_ui=mlflow_ui)
    except DistillError as err:
        fail(err)
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
        return
    edge = info["chain"][0]
    if edge["role"] == "edge" and edge["aliases"] and edge.get("gates_outcome") != "pass" and \
            not (edge.get("gates_outcome") == "insufficient" and ("waiver" in edge["promotion"] or
                                                                  edge["aliases"] == ["challenger"])):
        err_console.print(f"⚠ {info['name']} v{info['version']} is @{', @'.join(edge['aliases'])} although its gates "
                          f"are {edge.get('gates_outcome')} and no waiver is recorded: an alias moved by hand? run "
                          f"`distill verify {model}`", style="bold red")
    run = info["pipeline_run"]
    root = _Branch(f"{info['name']} v{info['version']}  ({model})  pipeline run {run['run_id']} "
                   f"(trigger: {run['trigger_reason']})")
    node = root
    for link in info["chain"]:
        role = link["role"]
        if role in ("edge", "student", "teacher"):
            text = (f"{role} {link['name']} v{link['version']}  sha256 {str(link['digest'])[:16]}  "
                    f"run {link['run_id']}" + (f"  @{', @'.join(link['aliases'])}" if link["aliases"] else ""))
            node = node.add(text, highlight=False)
            if role == "edge":
                node.add(f"{link['primary']} (INT8: {link['quantized']}, candidate {link['candidate']}), gates passed: "
                         f"{link['gates_passed']}, owner {link['owner']}", highlight=False)
                if link["promotion"]:
                    node.add(f"promoted by {link['promotion'].get('approver')} at {link['promotion'].get('at')}",
                             highlight=False)
            if role == "teacher":
                moved = {a: v for a, v in link["aliases_now"].items() if v != link["version"]}
                node.add(f"licence {link['license']}" + (f" (override: {link['license_override']})"
                                                         if link.get("license_override") else ""), highlight=False)
                if link.get("replaces"):
                    r = link["replaces"]
                    before = f" (teacher {r['teacher']})" if r.get("teacher") else ""
                    changed = "; the teacher changed" if r.get("teacher") and r["teacher"] != \
                        f"{link['name']}/{link['version']}" else ""
                    node.add(f"made to replace champion v{r['version']}{before}{changed}", highlight=False)
                if moved:
                    node.add(f"⚠ aliases now elsewhere: {', '.join(f'@{a} -> v{v}' for a, v in moved.items())}; "
                             f"this model was made from v{link['version']}", highlight=False)
            node.add(f"{link['link']}", highlight=False)
        elif role == "soft labels":
            node = node.add(f"soft labels key {str(link['key'])[:16]}  {link['uri']}", highlight=False)
            if link.get("extra"):
                a = link["extra"]
                node.add(f"+ {a['rows']} extra rows (augmentation, production, feedback): key {a['key'][:16]}, data "
                         f"{str(a['digest'])[:16]}", highlight=False)
                if a.get("production"):
                    node.add(f"+ from the production sample {a['production']['uri']} (sha256 "
                             f"{a['production']['sha256'][:16]})", highlight=False)
        elif role == "data":
            data = node.add(f"data sha256 {link['digest'][:16]}", highlight=False)
            for split, digest in link.get("splits", {}).items():
                data.add(f"{split}: sha256 {digest}", highlight=False)
            if link.get("problem"):
                data.add(f"⚠ {link['problem']}", highlight=False)
    for line in root.lines():
        console.print(line, highlight=False)  # never cropped: digests and run ids stay whole
    console.print(f"pipeline run  {run['link']}" + (f"\nprefect run   {run['prefect_flow_run']}" if run["prefect_flow_run"] else ""),
                  highlight=False)
    console.print(f"attestations  {info['attestation_uri']}  (check them: distill verify {model})", highlight=False)


@app.command()
def verify(model: str = typer.Argument(..., help="models:/<name>-edge@champion or models:/<name>-edge/3"),
           tracking_uri: str = TrackingOpt,
           public_key: Optional[list[str]] = typer.Option(None, "--public-key", help="trusted signing public key (PEM); "
                                                          "default: the local key pair's (governance.key_dir)"),
           key_dir: Optional[Path] = typer.Option(None, help="folder of the local key pair (default .distill/keys)"),
           trust_registry_key: bool = typer.Option(False, "--trust-registry-key", help="with no trusted key: trust "
                                                   "the key the registry itself records (whoever writes the registry "
                                                   "can then sign for it)")):
    """Recompute every digest and check every signature behind a model; exit 1 naming any broken link."""

    from distill_gap.edge.serving import stdout_to_stderr
    from distill_gap.errors import DistillError
    from distill_gap.governance.verify import verify as run_verify
    from distill_gap.registry.model_uri import registry_client

    try:
        with stdout_to_stderr():
            result = run_verify(registry_client(tracking_uri), model, public_keys=public_key, key_dir=key_dir,
                                trust_registry=trust_registry_key, log=lambda m: err_console.print(Text(m, style="dim")))
    except DistillError as err:
        fail(err)
    if result.key_source.startswith("WARNING"):
        err_console.print(Text(result.key_source, style="yellow"))
    table = Table(title=Text(f"verify {result.uri} (keys: {result.key_source})"))
    for col in ("link", "result", "detail"):
        table.add_column(col)
    for c in result.checks:  # Text: paths and names are never read as markup
        table.add_row(Text(c.link), Text("ok", style="green") if c.ok else Text("BROKEN", style="bold red"),
                      Text(c.detail))
    console.print(table)
    if not result.ok:
        broken = [c.link for c in result.checks if not c.ok]
        err_console.print(Text("verification failed: ", style="bold red") + Text(", ".join(broken)))
        raise typer.Exit(1)
    console.print(Text(f"all {len(result.checks)} checks passed", style="green"))


@app.command()
def dossier(model: str = typer.Argument(..., help="models:/<name>-edge@champion or models:/<name>-edge/3"),
            tracking_uri: str = TrackingOpt,
            html: Optional[Path] = typer.Option(None, "--html", help="write the self-contained HTML page here"),
            as_json: bool = typer.Option(False, "--json", help="print the dossier as a signed in-toto Statement "
                                                              "(DSSE, the local key pair of --key-dir)"),
            key_dir: Path = typer.Option(Path(".distill/keys"), help="folder of the local key pair")):
    """Compile an edge version's dossier afresh from the records: scope, gates, lineage, approver, review."""
    from distill_gap.errors import DistillError
    from distill_gap.governance.dossier import dossier_for, dossier_statement
    from distill_gap.governance.dossier_render import render_dossier
    from distill_gap.governance.lineage import _version
    from distill_gap.registry.model_uri import registry_client

    try:
        client = registry_client(tracking_uri)
        mv = _version(client, model)
        if not mv.name.endswith("-edge"):
            raise DistillError(f"{mv.name} is not an edge model: dossiers are per edge version",
                               f"pass models:/{mv.name.removesuffix('-student')}-edge@champion")
        d = dossier_for(client, mv)
        if html is not None:
            html.parent.mkdir(parents=True, exist_ok=True)
            html.write_text(render_dossier(d))
        if as_json:
            from distill_gap.signing import ensure_key_pair, sign_statement

            envelope = sign_statement(dossier_statement(d), ensure_key_pair(key_dir))
            sys.stdout.write(json.dumps(envelope, indent=2) + "\n")
            return
    except DistillError as err:
        fail(err)
    ev, gov = d["evidence"], d["governance"]
    colour = {"pass": "green", "fail": "bold red", "insufficient": "yellow"}[ev["outcome"]]
    console.print(Text(f"{mv.name} v{mv.version} {' '.join('@' + a for a in d['status']['aliases'])}  gates: ")
                  + Text(ev["outcome"], style=colour) + Text(f" ({len(ev['gates'])} gates, {len(ev['failed'])} failed, "
                  f"{len(ev['insufficient'])} insufficient)"))
    console.print(f"use: {d['intended_use']['use']}", highlight=False, markup=False)
    for item in d["intended_use"]["not_for"]:
        console.print(f"  not for: {item}", highlight=False, markup=False)
    t = d["lineage"]["teacher"]
    console.print(f"teacher {t['name']} v{t['version']} (licence {t['license']}), {len(d['lineage']['steps'])} signed "
                  f"steps, owner {gov['owner']}", highlight=False, markup=False)
    review = gov["review"]
    console.print(Text(f"review due {review['due']}") + Text(" (OVERDUE)" if review["overdue"] else "", style="bold red"),
                  highlight=False)
    if gov.get("waiver"):
        console.print(f"waiver of {', '.join(gov['waiver']['gates'])} by {gov['waiver']['approver']}: "
                      f"{gov['waiver']['reason']}", highlight=False, markup=False)
    elif gov.get("approver"):
        console.print(f"approved by {gov['approver']['name']} at {gov['approver']['at']}", highlight=False, markup=False)
    for problem in d["lineage"]["problems"]:
        err_console.print(f"record not used: {problem}", highlight=False, markup=False)
    if html is not None:
        console.print(f"wrote {html}", highlight=False, markup=False)
    console.print(f"verify: {d['verify']}", highlight=False, markup=False)


@app.command()
def promote(config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt,
            version: int = typer.Option(..., help="the <name>-edge version to promote"),
            reason: str = typer.Option("manual", help="recorded on the promotion")):
    """Promote an edge version that passed its gates (asks for approval when approval.required); idempotent."""
    from distill_gap.errors import DistillError

    try:
        cfg = load_cfg(config, set)
        from distill_gap.registry.tracking import client_for
        from distill_gap.registry.versions import resolve_version

        if version < 1:
            raise DistillError(f"--version {version}: versions are numbered from 1", "pass an existing version number")
        try:  # before any run starts
            resolve_version(client_for(cfg.tracking), cfg.edge_model_name, version=version)
        except DistillError as err:
            raise DistillError(err.problem, f"promote a version that exists: `distill lineage models:/"
                                            f"{cfg.edge_model_name}@challenger` or the MLflow UI lists them") from None
        from flows.promote import promote_edge
        from distill_gap.ops.prefect_server import tie_ephemeral_server

        tie_ephemeral_server()

        result = promote_edge(cfg, version=version, reason=reason)
    except DistillError as err:
        fail(err)
    console.print(f"{cfg.edge_model_name}: @champion -> v{result['champion']}"
                  + ("" if result["changed"] else f" (unchanged: {result['reason']})"), highlight=False)


@app.command()
def approve(target: str = typer.Argument(..., help="a paused flow run id, or models:/<name>-edge/<version> to waive "
                                                    "its insufficient-evidence gates"),
            approver: str = typer.Option(..., help="your name (recorded; for a waiver, an approver with a key)"),
            decision: Optional[str] = typer.Option(None, help="approve or reject (a paused flow run)"),
            comment: str = typer.Option("", help="why (recorded)"),
            waive: Optional[str] = typer.Option(None, help="gates to waive, comma-separated (a models:/ URI)"),
            sign_only: bool = typer.Option(False, "--sign-only", help="with a models:/ URI and --decision: print "
                                           "your signed decision, to paste into the Prefect form's signature field"),
            reason: str = typer.Option("", help="why the gap is acceptable (a waiver; recorded and signed)"),
            key_dir: Optional[Path] = typer.Option(None, help="your key pair's folder (default: "
                                                   "<governance.key_dir>/approvers/<approver>)"),
            config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt):
    """Answer a paused promotion without the UI, or waive a version's insufficient-evidence gates with your own
    signature so that it becomes @champion (a failed gate can never be waived)."""
    from distill_gap.ops.prefect_server import tie_ephemeral_server
    from distill_gap.errors import DistillError
    from distill_gap.governance.promotion import answer_run

    tie_ephemeral_server()
    try:
        if target.startswith("models:/"):
            from distill_gap.governance.promotion import waive_and_promote
            from distill_gap.registry.model_uri import parse_model_uri
            from distill_gap.registry.tracking import client_for

            name, alias, version = parse_model_uri(target)
            if version is None:
                raise DistillError(f"{target} names an alias", f"name the version: models:/{name}/<version>")
            if sign_only:
                cfg = load_cfg(config, set)
                sys.stdout.write(json.dumps(_signed_decision(cfg, name, version, approver, decision, comment,
                                                             key_dir)) + "\n")
                return
            if not waive or not reason.strip():
                raise DistillError("a waiver names the gates and the reason",
                                   "pass --waive <gate>[,<gate>] --reason '<why the gap is acceptable>'")
            cfg = load_cfg(config, set)
            result = waive_and_promote(client_for(cfg.tracking), cfg, name=name, version=version, approver=approver,
                                       waived=[g.strip() for g in waive.split(",") if g.strip()], reason=reason,
                                       key_dir_override=key_dir, log=lambda m: err_console.print(m, highlight=False))
            console.print(f"{name} v{version}: {', '.join(result['waived'])} waived by {approver} (signed: "
                          f"{result['waiver_uri']}); @champion -> v{result['champion']}", highlight=False)
            return
        if decision is None:
            raise DistillError("answering a paused flow run needs a decision", "pass --decision approve|reject")
        answer = {"approver": approver, "decision": decision, "comment": comment}
        cfg = load_cfg(config, set)
        from distill_gap.governance.promotion import paused_version
        from distill_gap.governance.waiver import has_key

        if has_key(cfg.approval, approver):  # an approver with a key signs the decision on the version asked about
            version = paused_version(target)
            if version is None:
                raise DistillError(f"flow run {target} is not waiting for an approval",
                                   "only a paused promotion can be answered; check the run in the Prefect UI")
            answer["signature"] = json.dumps(_signed_decision(cfg, cfg.edge_model_name, version, approver, decision,
                                                              comment, key_dir))
        answer_run(target, answer)
    except DistillError as err:
        fail(err)
    console.print(f"flow run {target} resumed with decision {decision} by {approver}"
                  + (" (signed)" if "signature" in answer else ""))


def _signed_decision(cfg, name: str, version: int, approver: str, decision: str | None, comment: str,
                     key_dir: Optional[Path]) -> dict:
    """The approver's signed approval (or rejection) of `name` v`version`, over the digest the registry holds."""
    from mlflow.exceptions import MlflowException

    from distill_gap.errors import DistillError
    from distill_gap.governance.waiver import sign_approval
    from distill_gap.registry.tracking import client_for

    if decision not in ("approve", "reject"):
        raise DistillError(f"decision {decision!r}", "pass --decision approve|reject")
    try:
        digest = client_for(cfg.tracking).get_model_version(name, str(version)).tags.get("model.digest", "")
    except MlflowException:
        raise DistillError(f"{name} has no version {version} in {cfg.tracking.uri}",
                           "pass the config of the pipeline that asks (--config)") from None
    return sign_approval(cfg.governance, approver=approver, key_dir_override=key_dir, name=name, version=version,
                         digest=digest, decision=decision, comment=comment)


@app.command("approver-key")
def approver_key(approver: str = typer.Argument(..., help="the approver's name, as in approval.approvers"),
                 config: Path = ConfigOpt, set: Optional[list[str]] = SetOpt):
    """Create (or show) an approver's own signing key pair; prints the config entry that lists its public key."""
    from distill_gap.errors import DistillError
    from distill_gap.governance.waiver import create_approver_key

    try:
        key = create_approver_key(load_cfg(config, set).governance, approver)
    except DistillError as err:
        fail(err)
    console.print(f"private key {key.private_path} (keep it to yourself)\npublic key  {key.public_path}\n"
                  f"add to the config:\napproval:\n  approvers:\n    - {{name: {approver}, public_key: "
                  f"{key.public_path}}}", highlight=False)


@app.command()
def rollback(model: str = typer.Argument(..., help="the registered edge model, e.g. demo-edge"),
             to: int = typer.Option(..., "--to", help="the version to make @champion again"),
             reason: str = typer.Option(..., help="why (recorded on the version and in a signed attestation)"),
             by: Optional[str] = typer.Option(None, help="who rolls back (default: the login name)"),
             tracking_uri: str = TrackingOpt,
             key_dir: Path = typer.Option(Path(".distill/keys"), envvar="DISTILL_KEY_DIR", help="signing key pair")):
    """Move @champion back to an earlier version that passed its gates; record who and why."""
    from flows.config import GovernanceConfig, TrackingConfig
    from distill_gap.errors import DistillError
    from distill_gap.governance.promotion import rollback as do_rollback
    from distill_gap.registry.model_uri import registry_client

    try:
        result = do_rollback(registry_client(tracking_uri), model, to, reason=reason, by=by,
                             governance=GovernanceConfig(key_dir=str(key_dir)),
                             tracking=TrackingConfig(uri=tracking_uri))
    except DistillError as err:
        fail(err)
    if not result["changed"]:
        console.print(f"{model} v{to} is already @champion: nothing changed")
        return
    console.print(f"{model}: @champion v{result['previous']} -> v{to} (by {result['by']}: {reason})", highlight=False)


