// @google-cloud/storage through the proxy, unchanged: a resumable upload and a download.
// Its credential comes from the metadata facade (GCE_METADATA_HOST, with
// METADATA_SERVER_DETECTION=assume-present); HTTPS_PROXY and NODE_EXTRA_CA_CERTS do the rest.
const crypto = require('crypto');
const fs = require('fs');
const {Storage} = require('@google-cloud/storage');

async function main() {
  const [bucketName, file, out] = process.argv.slice(2);
  const storage = new Storage();
  const bucket = storage.bucket(bucketName);
  await bucket.upload(file, {destination: 'node.bin', resumable: true});
  await bucket.file('node.bin').download({destination: out});
  const sha = (p) => crypto.createHash('sha256').update(fs.readFileSync(p)).digest('hex');
  const [files] = await bucket.getFiles();
  console.log(JSON.stringify({
    uploaded_sha256: sha(file),
    downloaded_sha256: sha(out),
    listed: files.map((f) => f.name),
  }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
