// Prints a realistic video.asset.ready event of exactly N bytes (argv[2]):
// the shape Mux sends, with more audio tracks for bulk and the rest in
// passthrough.
const size = Number(process.argv[2] || 2048);
const track = (i) => ({
  type: "audio", max_channels: 2, duration: 23.823333,
  id: "FXoMB3v6bPl1ZQ" + String(i).padStart(4, "0"), language_code: "en", status: "ready",
});
const build = (tracks, pad) => JSON.stringify({
  type: "video.asset.ready",
  request_id: null,
  object: { type: "asset", id: "Hb01ZkKzL6sH02b8GXq4dV7J00vzW3g8Q1" },
  id: "3a56ac3d-33da-4366-855b-f592d898409d",
  environment: { name: "Production", id: "j0863n" },
  data: {
    upload_id: "Gr01bSQt5aj8", tracks, status: "ready",
    playback_ids: [{ policy: "public", id: "v1pYxzCg8pp02bgKeSwjYfSCm01LJwsg00" }],
    passthrough: "p".repeat(pad), mp4_support: "none", max_stored_resolution: "HD",
    max_stored_frame_rate: 29.97, master_access: "none", id: "Hb01ZkKzL6sH02b8GXq4dV7J00vzW3g8Q1",
    duration: 23.857167, created_at: 1609869152, aspect_ratio: "16:9",
  },
  created_at: new Date().toISOString().replace(/\.\d+Z$/, ".000000Z"),
  attempts: [], accessor_source: null, accessor: null,
});
const tracks = [];
while (build(tracks, 0).length < size - 200) tracks.push(track(tracks.length));
while (build(tracks, 0).length > size) tracks.pop();
process.stdout.write(build(tracks, size - build(tracks, 0).length));
