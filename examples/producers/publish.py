"""Publish one herald job with publisher confirms (pip install pika)."""
import json
import os

import pika

job = {
    "v": 1,
    "id": "order-8812-shipped",
    "vendor": "netease",
    "account": "default",
    "from": "system",
    "to": {"user": "2839678182"},
    "key": "order.shipped",
    "data": {"order": 8812},
    "push": {"content": "Your order shipped"},
}

params = pika.URLParameters(os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
with pika.BlockingConnection(params) as conn:
    channel = conn.channel()
    channel.confirm_delivery()  # basic_publish raises if the broker does not confirm
    channel.basic_publish(
        exchange="herald.jobs",
        routing_key=f"{job['vendor']}.{job['account']}",
        body=json.dumps(job).encode(),
        properties=pika.BasicProperties(
            content_type="application/json", delivery_mode=2, message_id=job["id"]
        ),
    )
    print("published", job["id"])
