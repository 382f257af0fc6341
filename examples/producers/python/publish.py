"""Publish herald jobs (one JSON document or NDJSON on stdin) with publisher confirms."""
import json
import os
import signal
import sys
from pathlib import Path

import pika
from pika.exceptions import AMQPChannelError, AMQPConnectionError, NackError, UnroutableError

CONFIRM_TIMEOUT_S = 10
REPO_SCHEMA = Path(__file__).resolve().parents[3] / "docs" / "job.schema.json"


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def read_jobs(text):
    # raw_decode walks successive JSON values, so one pretty-printed job and NDJSON both parse.
    decoder, jobs, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return jobs
        try:
            job, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            fail(f"job {len(jobs) + 1} is not JSON: {e}")
        jobs.append(job)


def validator():
    path = REPO_SCHEMA if REPO_SCHEMA.exists() else os.environ.get("HERALD_SCHEMA")
    if not path:
        print("note: no docs/job.schema.json and no HERALD_SCHEMA; jobs are not validated",
              file=sys.stderr)
        return None
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads(Path(path).read_text()))


def check(jobs, schema):
    for n, job in enumerate(jobs, 1):
        if schema is not None:
            errors = sorted(schema.iter_errors(job), key=lambda e: list(e.absolute_path))
            if errors:
                where = "/".join(map(str, errors[0].absolute_path)) or "(job)"
                fail(f"job {n} does not match the herald job schema at {where}: {errors[0].message}")
        for field in ("id", "vendor", "account"):
            if not isinstance(job, dict) or not isinstance(job.get(field), str):
                fail(f"job {n} has no string `{field}`")


def on_timeout(signum, frame):
    raise TimeoutError


def main():
    jobs = read_jobs(sys.stdin.read())
    if not jobs:
        fail("no job on stdin")
    check(jobs, validator())
    exchange = os.environ.get("HERALD_PREFIX", "herald") + ".jobs"
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    # pika's blocking publish waits for the confirm without a deadline; an alarm gives it one.
    signal.signal(signal.SIGALRM, on_timeout)
    try:
        with pika.BlockingConnection(pika.URLParameters(url)) as conn:
            channel = conn.channel()
            channel.confirm_delivery()
            for job in jobs:
                routing_key = f"{job['vendor']}.{job['account']}"
                signal.alarm(CONFIRM_TIMEOUT_S)
                try:
                    # Never declares the exchange: herald owns the topology.
                    channel.basic_publish(
                        exchange=exchange,
                        routing_key=routing_key,
                        body=json.dumps(job).encode(),
                        properties=pika.BasicProperties(
                            content_type="application/json",
                            delivery_mode=pika.DeliveryMode.Persistent,
                            message_id=job["id"],
                        ),
                        mandatory=True,
                    )
                except UnroutableError:
                    fail(f"job {job['id']} was returned: nothing is bound to "
                         f"routing key {routing_key} on {exchange}")
                except NackError:
                    fail(f"job {job['id']} was refused (nack) by the broker")
                except TimeoutError:
                    fail(f"job {job['id']}: no publisher confirm within {CONFIRM_TIMEOUT_S}s")
                except AMQPChannelError as e:
                    fail(f"job {job['id']}: the broker closed the channel: {e} (is HERALD_PREFIX "
                         f"right, and did herald declare {exchange}?)")
                finally:
                    signal.alarm(0)
                print(job["id"], flush=True)
    except AMQPConnectionError as e:
        fail(f"cannot connect to {url.split('@')[-1]}: {e!r}")


if __name__ == "__main__":
    main()
