"""A Pub/Sub stand-in: grpcio serving Publisher.Publish, Subscriber.Pull and
Subscriber.Acknowledge with google-cloud-pubsub's own message types, over TLS. Every message
published to any topic is delivered to any subscription. Writes the `authorization` of each
call to the file named by argv[3], one per line. Prints its port.
"""
import sys
import threading
from concurrent import futures

import grpc
from google.protobuf import empty_pb2
from google.pubsub_v1 import types

lock = threading.Lock()
queue = []
next_id = [0]
seen = open(sys.argv[3], "a", buffering=1)


def note(context):
    auth = dict(context.invocation_metadata()).get("authorization", "")
    seen.write(auth + "\n")


def publish(request, context):
    note(context)
    ids = []
    with lock:
        for m in request.messages:
            next_id[0] += 1
            mid = str(next_id[0])
            queue.append(types.ReceivedMessage(
                ack_id="ack-" + mid,
                message=types.PubsubMessage(data=m.data, attributes=dict(m.attributes), message_id=mid),
            ))
            ids.append(mid)
    return types.PublishResponse(message_ids=ids)


def pull(request, context):
    note(context)
    with lock:
        batch = queue[: request.max_messages or 100]
        del queue[: len(batch)]
    return types.PullResponse(received_messages=batch)


def acknowledge(request, context):
    note(context)
    return empty_pb2.Empty()


def handler(fn, req, resp):
    return grpc.unary_unary_rpc_method_handler(
        fn,
        request_deserializer=req.deserialize,
        response_serializer=resp.serialize,
    )


server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((
    grpc.method_handlers_generic_handler("google.pubsub.v1.Publisher", {
        "Publish": handler(publish, types.PublishRequest, types.PublishResponse),
    }),
    grpc.method_handlers_generic_handler("google.pubsub.v1.Subscriber", {
        "Pull": handler(pull, types.PullRequest, types.PullResponse),
        "Acknowledge": grpc.unary_unary_rpc_method_handler(
            acknowledge,
            request_deserializer=types.AcknowledgeRequest.deserialize,
            response_serializer=empty_pb2.Empty.SerializeToString,
        ),
    }),
))
creds = grpc.ssl_server_credentials(
    ((open(sys.argv[2], "rb").read(), open(sys.argv[1], "rb").read()),)
)
port = server.add_secure_port("127.0.0.1:0", creds)
server.start()
print(port, flush=True)
server.wait_for_termination()
