"""``fedkrso-client --server host:50051 --data shard3``: one federated client process.

Joins the run, loads the base model, then trains the rounds it is selected for until the
server ends the run.

``--device`` / ``--dtype`` (or FEDKRSO_DEVICE / FEDKRSO_DTYPE) choose where and in which
precision this client trains; without them it follows the run's ``model.device`` and
``model.dtype``. Any choice agrees with the server's state (common/precision.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import structlog

from ..common import logs
from ..common.cli import add_log_args, add_placement_args, fail, parser, require_file

log = structlog.get_logger("fedkrso.client")
PROG = "fedkrso-client"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(PROG, __doc__, {0: "the run finished", 2: "bad flags, a missing shard or credential file, a "
                               "device that is not there",
                               3: "refused to go on (a different base model, inconsistent state, a server "
                               "that breaks the protocol: client/streams.py)",
                               4: "an RPC failed for good, or the server refused the credential",
                               5: "left the run: a round would take this data's DP-SGD epsilon past its budget "
                               "(--dp-sgd-budget, the ledger at --dp-ledger)",
                               130: "interrupted"})
    p.add_argument("--server", required=True, help="coordinator address host:port")
    p.add_argument("--data", required=True, help="shard name (e.g. shard3) or path of a saved split")
    p.add_argument("--data-root", default=".", help="folder holding the shards (fedkrso-partition --out)")
    p.add_argument("--eval-data", help="held-out split this client evaluates the global model on when the "
                   "run's eval.client_every asks (default: <data>/eval, written by fedkrso-partition)")
    p.add_argument("--model", help="local copy of the base model (default: the run's model spec)")
    p.add_argument("--name", help="display name (default: the shard name)")
    p.add_argument("--report", help="write a JSON report (rounds, final state fingerprint) here")
    p.add_argument("--ca", help="CA certificate (PEM) that signed the server's (default: system roots)")
    p.add_argument("--cert", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--key", help="private key of --cert (PEM)")
    p.add_argument("--token-file", help="file holding this client's bearer token (tokens-file servers)")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC even to a non-loopback server")
    p.add_argument("--server-name", help="TLS name to verify instead of the --server host (tests)")
    p.add_argument("--poll-seconds", type=float, default=20.0,
                   help="longest one long-poll for a round waits at the server before asking again")
    p.add_argument("--reconnect-seconds", type=float, default=300.0,
                   help="how long to keep retrying an unreachable server (rides out a restart)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 per process on small hosts)")
    p.add_argument("--dp-sgd-budget", type=float, metavar="EPSILON",
                   help="under privacy.dp_sgd: this data's own sample-level epsilon budget, over every run its "
                   "ledger records; a round that would pass it is refused (default: the run's "
                   "dp_sgd.epsilon_budget)")
    p.add_argument("--dp-ledger", help="under privacy.dp_sgd: the file recording what this data released "
                   "(default: <data>/dp_sgd_ledger.json)")
    add_placement_args(p)
    add_log_args(p)
    args = p.parse_args(argv)
    if (args.cert is None) != (args.key is None):
        p.error("--cert and --key go together")
    if args.insecure and (args.ca or args.cert):
        p.error("--insecure contradicts --ca / --cert")
    return args


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = Path(args.data)
    if not data.is_absolute() and not data.exists():
        data = Path(args.data_root) / args.data
    if not data.is_dir():
        fail(PROG, f"data not found: {data} (a shard written by fedkrso-partition)")
    for flag in ("ca", "cert", "key", "token_file"):
        if getattr(args, flag):
            require_file(PROG, getattr(args, flag), f"--{flag.replace('_', '-')}")
    logs.configure(args.log_level, args.log_json)
    import torch

    from ..common.precision import PlacementError, resolve_device

    if args.device:  # a device that is not there fails before joining, and before the heavy imports
        try:
            resolve_device(args.device)
        except PlacementError as err:
            fail(PROG, err)
    import grpc

    from ..common.participant import ParticipantError
    from ..common.privacy.ledger import BudgetExceeded
    from .runner import ClientError, ClientOptions, CredentialRefused, FedClient

    torch.set_num_threads(args.threads)
    path = _optional_path
    name = args.name or Path(args.data).name
    opts = ClientOptions(server=args.server, data=data, eval_data=path(args.eval_data), model=args.model, name=name,
                         poll_seconds=args.poll_seconds, report=path(args.report), ca=path(args.ca),
                         cert=path(args.cert), key=path(args.key), token_file=path(args.token_file),
                         insecure=args.insecure, server_name=args.server_name,
                         reconnect_seconds=args.reconnect_seconds, device=args.device, dtype=args.dtype,
                         dp_ledger=path(args.dp_ledger), dp_sgd_budget=args.dp_sgd_budget)
    try:
        FedClient(opts).run()
    except BudgetExceeded:
        sys.exit(5)  # logged as dp_sgd_budget_reached
    except CredentialRefused as err:
        log.error("credential_refused", client=name, reason=str(err))
        sys.exit(4)
    except (ClientError, ParticipantError) as err:
        from ..common.accounting import peak_rss_bytes

        log.error("client_refused", reason=str(err), peak_rss_bytes=peak_rss_bytes())
        sys.exit(3)
    except grpc.RpcError as err:
        log.error("rpc_failed", code=err.code().name, details=err.details())
        sys.exit(4)
    except FileNotFoundError as err:
        fail(PROG, err)
    except PlacementError as err:
        fail(PROG, err)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)


if __name__ == "__main__":
    main()
