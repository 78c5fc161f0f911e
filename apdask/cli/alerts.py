"""``apdask alerts``: validate, tail and replay alerts."""

from __future__ import annotations

import argparse
import io
from typing import Any

import fastavro

from apdask.alerts.schema import parsed_schema, schema_registry
from apdask.alerts.sinks import read_alerts, validate_alerts
from apdask.cli.common import strip_file
from apdask.core import jsonsafe
from apdask.services.consume import consume, validate_topic
from apdask.services.spool import replay_spool


def _num(value, fmt):
    return "null" if value is None else format(value, fmt)


def _alert_line(a):
    s = a["diaSource"]
    return (
        f"visit={s['visit']} det={s['detector']} band={s.get('band')} "
        f"mjd={_num(s.get('midpointMjdTai'), '.5f')} diaSourceId={a['diaSourceId']} "
        f"diaObjectId={s.get('diaObjectId')} ra={s['ra']:.6f} dec={s['dec']:.6f} "
        f"psfFlux={_num(s.get('psfFlux'), '.1f')}±{_num(s.get('psfFluxErr'), '.1f')} nJy "
        f"snr={_num(s.get('snr'), '.1f')} reliability={_num(s.get('reliability'), '.2f')} "
        f"nPrv={len(a['prvDiaSources'] or [])}"
    )


def alerts_command(args: argparse.Namespace) -> int:
    if args.alerts_command == "replay":
        rep = replay_spool(args.spool, args.to)
        print(jsonsafe.dumps(rep))
        return 75 if rep["remaining"] else 0  # EX_TEMPFAIL: run it again later
    kafka_src = args.source.startswith("kafka://")
    if args.alerts_command == "validate":
        if kafka_src:
            rep = validate_topic(args.source)
        else:
            rep = validate_alerts(strip_file(args.source))
        print(jsonsafe.dumps(rep))
        if rep["problems"]:
            return 65
        return 0
    if not kafka_src:
        for a in read_alerts(strip_file(args.source)):
            print(_alert_line(a), flush=True)  # a closed pipe is seen here, in main()
        return 0

    follow = args.follow or not args.from_beginning
    for msg, data in consume(args.source, from_beginning=args.from_beginning, follow=follow):
        if data is None or len(data) < 5 or data[0] != 0:
            print(f"partition={msg.partition()} offset={msg.offset()}: not a Confluent frame")
            continue
        parsed = parsed_schema(
            schema_registry().get_by_id(int.from_bytes(data[1:5], "big", signed=True))
        )

        record: Any = fastavro.schemaless_reader(io.BytesIO(data[5:]), parsed, parsed)
        print(f"p={msg.partition()} o={msg.offset()} " + _alert_line(record), flush=True)
    return 0
