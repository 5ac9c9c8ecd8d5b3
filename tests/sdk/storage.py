"""google-cloud-storage through the proxy, unchanged: no credentials in code, no key file.

The library finds its credential at the metadata facade (GCE_METADATA_HOST), reaches
storage.googleapis.com through HTTPS_PROXY and trusts the proxy through the merged bundle.
Prints what it saw as JSON on the last line.
"""
import hashlib
import json
import os
import sys

import google.auth
from google.cloud import storage

bucket_name = sys.argv[1]
credentials, project = google.auth.default()
client = storage.Client()
bucket = client.create_bucket(bucket_name)
buckets = [b.name for b in client.list_buckets()]

data = os.urandom(10 * 1024 * 1024 + 123)
blob = bucket.blob("py.bin")
# A chunk size makes the upload resumable: 6 requests after the one that opens the session.
blob.chunk_size = 2 * 1024 * 1024
blob.upload_from_string(data, content_type="application/octet-stream")
got = bucket.blob("py.bin").download_as_bytes()
listed = [b.name for b in client.list_blobs(bucket)]
bucket.blob("py.bin").delete()
after = [b.name for b in client.list_blobs(bucket)]

print(json.dumps({
    "credentials": type(credentials).__module__ + "." + type(credentials).__name__,
    "project": project,
    "buckets": buckets,
    "uploaded_sha256": hashlib.sha256(data).hexdigest(),
    "downloaded_sha256": hashlib.sha256(got).hexdigest(),
    "listed": listed,
    "after_delete": after,
}))
