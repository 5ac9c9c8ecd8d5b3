"""google-cloud-pubsub over gRPC through the proxy, unchanged: publish 100 messages, pull and
acknowledge them. The credential comes from the metadata facade; grpc takes https_proxy and
GRPC_DEFAULT_SSL_ROOTS_FILE_PATH from the environment. Prints what it got as JSON.
"""
import json

import google.auth
from google.cloud import pubsub_v1

credentials, project = google.auth.default()
publisher = pubsub_v1.PublisherClient()
topic = publisher.topic_path(project, "sdk-topic")
futures = [publisher.publish(topic, f"message {i}".encode(), n=str(i)) for i in range(100)]
ids = [f.result(timeout=30) for f in futures]

subscriber = pubsub_v1.SubscriberClient()
subscription = subscriber.subscription_path(project, "sdk-sub")
got = []
for _ in range(20):
    resp = subscriber.pull(request={"subscription": subscription, "max_messages": 100}, timeout=30)
    if resp.received_messages:
        got.extend(m.message.data.decode() for m in resp.received_messages)
        subscriber.acknowledge(
            request={"subscription": subscription, "ack_ids": [m.ack_id for m in resp.received_messages]},
            timeout=30,
        )
    if len(got) >= 100:
        break

print(json.dumps({"project": project, "published": len(ids), "received": sorted(got)}))
