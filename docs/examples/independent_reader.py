"""Read an alert topic the way a broker would, without apdask.

Uses only confluent-kafka, fastavro and lsst.alert.packet: every message is
unframed (Confluent wire format: magic byte 0, big-endian int32 schema id),
its schema is looked up by id in Rubin's shipped registry and the body is
decoded with ``fastavro.schemaless_reader``.  Prints one JSON summary.

    python docs/examples/independent_reader.py 127.0.0.1:9092 alerts-topic
"""

import io
import json
import struct
import sys

import fastavro
from confluent_kafka import Consumer, KafkaError, TopicPartition
from lsst.alert.packet import SchemaRegistry


def main(bootstrap, topic):
    registry = SchemaRegistry.all_schemas_from_filesystem()
    parsed = {}
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "independent-reader",
                         "enable.auto.commit": False, "enable.partition.eof": True})  # fmt: skip
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    # stop at each partition's end-of-partition event, not at the high watermark:
    # tansu 0.6 reports the base offset of the last record batch as the watermark
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])
    at_end = set()
    ids, problems, sizes, cutouts = [], [], [], 0
    while len(at_end) < len(parts):
        msg = consumer.poll(10)
        if msg is None:
            problems.append("timed out before the end of the topic")
            break
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:
                at_end.add(msg.partition())
            else:
                problems.append(str(msg.error()))
            continue
        at_end.discard(msg.partition())
        value = msg.value()
        magic, schema_id = struct.unpack(">bi", value[:5])
        if magic != 0:
            problems.append(f"offset {msg.offset()}: magic byte {magic}")
            continue
        if schema_id not in parsed:
            parsed[schema_id] = fastavro.parse_schema(registry.get_by_id(schema_id).definition)
        alert = fastavro.schemaless_reader(io.BytesIO(value[5:]), parsed[schema_id])
        ids.append(alert["diaSourceId"])
        sizes.append(len(value))
        # Rubin's conventions (the default): no key and a producer_timestamp header
        # (ms); apdask's: the diaObjectId as an int64 key (docs/alerts.md)
        if msg.key() is not None:
            key = struct.unpack(">q", msg.key())[0]
            if key != alert["diaSource"]["diaObjectId"]:
                problems.append(f"diaSourceId {ids[-1]}: key {key} is not the diaObjectId")
        elif "producer_timestamp" not in dict(msg.headers() or ()):
            problems.append(f"diaSourceId {ids[-1]}: no key and no producer_timestamp header")
        for name in ("cutoutDifference", "cutoutScience", "cutoutTemplate"):
            stamp = alert[name]
            if stamp is not None and stamp[:6] == b"SIMPLE":
                cutouts += 1
            else:
                problems.append(f"diaSourceId {ids[-1]}: {name} is not FITS")
    consumer.close()
    sizes.sort()
    print(json.dumps({
        "messages": len(ids),
        "distinct_diaSourceIds": len(set(ids)),
        "schema_ids": sorted(parsed),
        "fits_cutouts": cutouts,
        "bytes_median": sizes[len(sizes) // 2] if sizes else None,
        "bytes_max": sizes[-1] if sizes else None,
        "problems": problems[:20],
        "n_problems": len(problems),
    }, indent=1))  # fmt: skip
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
