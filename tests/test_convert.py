"""ArrayRecord converter + grain source on tiny Waymo and OpenDV data in their real on-disk formats."""
import json
import os

import numpy as np
import pytest

import waymo_fixture as wf
from cvd_storm_jax.data_pipelines import arrayrecord_source, convert, opendv, schema, waymo

HW = (16, 24)
WAYMO_KW = dict(max_points=64, max_boxes=4)


@pytest.fixture(scope="module")
def waymo_root(tmp_path_factory):
  d = tmp_path_factory.mktemp("waymo_src")
  wf.write_segment(d, "ctxA", 5)
  wf.write_segment(d, "ctxB", 4)
  wf.write_segment(d, "badjpeg", 4, corrupt_jpeg_frame=3)
  wf.write_segment(d, "nocam", 4, missing_camera_frame=0)
  path = wf.write_segment(d, "trunc", 4)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 7)
  return d


def _convert(root, out, **kw):
  return convert.convert("waymo", str(root), str(out), image_size=HW, clip_frames=3, reader_kwargs=WAYMO_KW,
                         progress=False, **kw)


@pytest.fixture(scope="module")
def waymo_out(waymo_root, tmp_path_factory):
  out = tmp_path_factory.mktemp("waymo_out")
  summary = _convert(waymo_root, out)
  return out, summary


def _assert_same_sample(got, want):
  assert set(want) <= set(got)
  for k, v in want.items():
    if k == "images":
      assert np.abs(got[k].astype(int) - v).max() <= 3  # JPEG loss on solid colours.
    elif isinstance(v, np.ndarray):
      assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
    else:
      assert got[k] == v, k


def test_summary_counts_skips(waymo_out):
  _, summary = waymo_out
  assert summary["scenes_total"] == 5 and summary["scenes_converted"] == 5
  assert summary["skipped"] == {"corrupt_image": 1, "missing_sensor": 1, "truncated_record": 1}
  # ctxA: 3 clips; ctxB: 2; badjpeg (frame 3 bad): 1; nocam (frame 0 bad): 1; trunc (frame 3 lost): 1.
  assert summary["clips"] == 8
  assert summary["records"] == 5 + 4 + 3 + 3 + 3


def test_index_and_files(waymo_out):
  out, _ = waymo_out
  index = json.loads((out / "index.json").read_text())
  assert sorted(index["clips"]) == ["badjpeg@0", "ctxA@0", "ctxA@1", "ctxA@2", "ctxB@0", "ctxB@1", "nocam@1",
                                    "trunc@0"]
  assert [r for _, r in index["clips"]["ctxA@2"]["frames"]] == [2, 3, 4]
  assert [r for _, r in index["clips"]["nocam@1"]["frames"]] == [0, 1, 2]  # Frame 0 skipped: records shift.
  assert not os.listdir(out / "tmp")
  assert summary_file_matches(out)


def summary_file_matches(out):
  return json.loads((out / "summary.json").read_text())["clips"] == 8


def test_source_equals_reader(waymo_root, waymo_out):
  out, _ = waymo_out
  source = arrayrecord_source.ArrayRecordClipSource(out)
  reader = waymo.WaymoReader(waymo_root, clip_frames=3, image_size=HW, **WAYMO_KW)
  assert len(source) == 8
  for i in range(len(source)):
    got = source[i]
    schema.validate(got)
    scene, _, start = source.clip_id(i).rpartition("@")
    if scene == "nocam":
      # Frame 0 of "nocam" was skipped, so its stored clip @1 is reader frames 1..3.
      want = reader.read_clip("nocam@1")
    else:
      want = reader.read_clip(source.clip_id(i))
    _assert_same_sample(got, want)
  # Map, boxes and LiDAR really present (not trivially equal empties).
  s = source[source._clip_ids.index("ctxA@1")]
  assert s["map_mask"].any() and s["box_mask"].any() and s["lidar_mask"].any()


def test_never_a_sample_across_a_bad_frame(waymo_out):
  out, _ = waymo_out
  index = json.loads((out / "index.json").read_text())
  for cid, entry in index["clips"].items():
    frames = [r for _, r in entry["frames"]]
    assert frames == list(range(frames[0], frames[0] + 3)), cid


def _tree_bytes(out):
  files = {}
  for sub in ("shards", "maps", "scenes"):
    for name in sorted(os.listdir(out / sub)):
      files[f"{sub}/{name}"] = (out / sub / name).read_bytes()
  for name in ("index.json", "summary.json"):
    files[name] = (out / name).read_bytes()
  return files


def test_unreadable_scene_is_one_counted_skip(tmp_path):
  """A segment whose frame 0 (which holds the map) cannot be read -- empty file, CRC mismatch, truncated -- is one
  counted skip with a done marker of no records, not an abort of the whole conversion (and of every rerun)."""
  src = tmp_path / "src"
  src.mkdir()
  wf.write_segment(src, "good", 3)
  (src / "segment-empty_with_camera_labels.tfrecord").write_bytes(b"")
  wf.flip_record_byte(wf.write_segment(src, "crc0", 3), 0)
  path = wf.write_segment(src, "trunc0", 3)
  with open(path, "r+b") as f:
    f.truncate(50)  # Inside frame 0's payload.
  summary = _convert(src, tmp_path / "out")
  assert summary["scenes_converted"] == 4 and summary["skipped"] == {"unreadable_scene": 3}
  assert summary["clips"] == 1 and summary["records"] == 3
  for scene in ("empty", "crc0", "trunc0"):
    marker = json.loads((tmp_path / "out" / "scenes" / f"{convert.safe_name(scene)}.json").read_text())
    assert marker["records"] == [] and marker["clips"] == {} and marker["skipped"] == {"unreadable_scene": 1}
  assert _convert(src, tmp_path / "out") == summary  # The rerun moves on (all done), no error.
  source = arrayrecord_source.ArrayRecordClipSource(tmp_path / "out")
  assert len(source) == 1 and len(list(source.captions())) == 3 * 6  # The empty shards read as empty.


def test_crc_mismatch_is_counted_as_corrupt_record(tmp_path):
  wf.flip_record_byte(wf.write_segment(tmp_path, "crc2", 4), 2)
  summary = _convert(tmp_path, tmp_path / "out")
  assert summary["skipped"] == {"corrupt_record": 1} and summary["records"] == 3


def test_kill_and_restart_gives_same_output(waymo_root, waymo_out, tmp_path):
  out, _ = waymo_out
  with pytest.raises(convert.SimulatedKill):
    _convert(waymo_root, tmp_path, fail_after_scenes=2)
  assert len(os.listdir(tmp_path / "scenes")) == 2
  assert os.listdir(tmp_path / "tmp")  # The killed scene's half-written shard, not in shards/.
  assert len(os.listdir(tmp_path / "shards")) == 2
  summary = _convert(waymo_root, tmp_path)
  assert summary["scenes_converted"] == 5
  assert _tree_bytes(tmp_path) == _tree_bytes(out)


def test_env_var_kill(waymo_root, tmp_path, monkeypatch):
  monkeypatch.setenv(convert.FAIL_ENV, "0")
  with pytest.raises(convert.SimulatedKill):
    _convert(waymo_root, tmp_path)
  assert not os.listdir(tmp_path / "scenes") and not os.listdir(tmp_path / "shards")


def test_worker_killed_by_the_os_stops_the_run_and_a_rerun_resumes(waymo_root, waymo_out, tmp_path, monkeypatch):
  """Two worker processes; one dies mid-scene without an exception (os._exit, as the OOM killer leaves it): the run
  stops with an error (multiprocessing.Pool waited forever), and the rerun completes the same output."""
  monkeypatch.setenv(convert.FAIL_ENV, "3")
  monkeypatch.setenv(convert.FAIL_MODE_ENV, "exit")
  with pytest.raises(RuntimeError, match="worker died"):
    _convert(waymo_root, tmp_path, workers=2)
  monkeypatch.delenv(convert.FAIL_ENV)
  summary = _convert(waymo_root, tmp_path)
  assert summary["scenes_converted"] == 5
  assert _tree_bytes(tmp_path) == _tree_bytes(waymo_out[0])


def test_frame_record_round_trip():
  rng = np.random.default_rng(0)
  frame = {
      "images": np.broadcast_to((np.arange(16)[:, None, None] * 8 + np.arange(16)[None, :, None] * 4
                                 + np.array([0, 40, 80])).astype(np.uint8), (6, 16, 16, 3)).copy(),
      "view_mask": np.array([1, 0, 1, 1, 1, 1], bool),
      "intrinsics": rng.normal(size=(6, 3, 3)).astype(np.float32),
      "cam_to_ego": rng.normal(size=(6, 4, 4)).astype(np.float32),
      "ego_to_world": rng.normal(size=(4, 4)).astype(np.float32), "timestamp": 0.123456789,
      "boxes": rng.normal(size=(2, 7)).astype(np.float32), "box_class": np.array([1, 4], np.int32),
      "box_track_id": np.array([7, 9], np.int32), "lidar_points": rng.normal(size=(5, 3)).astype(np.float32),
      "captions": np.array(["a", "", "ü", "d", "e", "f"], dtype=object),
  }
  got = convert.decode_frame(convert.encode_frame(frame, "s", 3))
  assert got["scene"] == "s" and got["frame_index"] == 3 and got["timestamp"] == frame["timestamp"]
  for k in ("view_mask", "intrinsics", "cam_to_ego", "ego_to_world", "boxes", "box_class", "box_track_id",
            "lidar_points", "captions"):
    assert np.array_equal(got[k], frame[k]) and got[k].dtype == frame[k].dtype, k
  assert np.all(got["images"][1] == 0) and np.abs(got["images"][0].astype(int) - frame["images"][0]).mean() < 3
  assert b"pickle" not in convert.encode_frame(frame, "s", 3)


def test_cli_opendv(tmp_path):
  import test_opendv
  root = test_opendv.write_dataset(tmp_path / "src")
  out = tmp_path / "out"
  assert convert.main(["--dataset", "opendv", "--root", str(root), "--out", str(out), "--image-size", "24x32",
                       "--clip-frames", "5", "--clip-stride", "10", "--no-progress"]) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["clips"] == 2 and summary["records"] == 20 and summary["skipped_total"] == 0
  source = arrayrecord_source.ArrayRecordClipSource(out)
  reader = opendv.OpenDVReader(root, clip_frames=5, image_size=(24, 32))
  for i in range(len(source)):
    got, want = source[i], reader.read_clip(source.clip_id(i))
    assert np.abs(got["images"].astype(int) - want["images"]).max() <= 4
    _assert_same_sample({k: v for k, v in got.items() if k != "images"},
                        {k: v for k, v in want.items() if k != "images"})


def test_opendv_stacked_views_convert_clip_by_clip(tmp_path):
  """OpenDV with stack_views (independent clips as views, as OpenDWM trains on it) converts clip by clip and reads
  back as the reader's stacked samples."""
  import test_opendv
  root = test_opendv.write_dataset(tmp_path / "src")
  kw = dict(clip_stride=5, stack_views=2)
  summary = convert.convert("opendv", str(root), str(tmp_path / "out"), image_size=(24, 32), clip_frames=5,
                            reader_kwargs=kw, progress=False)
  reader = opendv.OpenDVReader(root, clip_frames=5, image_size=(24, 32), **kw)
  source = arrayrecord_source.ArrayRecordClipSource(tmp_path / "out")
  assert len(source) == summary["clips"] == len(reader.list_clips()) == 2
  for i in range(len(source)):
    got, want = source[i], reader.read_clip(source.clip_id(i))
    assert got["view_mask"].tolist() == [True, True, False, False, False, False]
    assert np.abs(got["images"].astype(int) - want["images"]).max() <= 4
    _assert_same_sample({k: v for k, v in got.items() if k != "images"},
                        {k: v for k, v in want.items() if k != "images"})


def test_unknown_dataset_and_bad_size():
  with pytest.raises(ValueError, match="unknown dataset"):
    convert.convert("kitti", "/nonexistent", "/tmp/x")
  with pytest.raises(SystemExit):
    convert.main(["--dataset", "waymo", "--root", "x", "--out", "y", "--image-size", "256"])


def test_nuscenes_clip_reader_path(tmp_path):
  """Readers that only produce clips (the nuScenes reader) are converted clip by clip, non-overlapping."""
  fx = pytest.importorskip("nuscenes_fixture")
  from cvd_storm_jax.data_pipelines.nuscenes import NuScenesReader
  tree = fx.write_nuscenes_tree(str(tmp_path / "nusc"))
  sizes = dict(max_boxes=8, max_lidar_points=64, max_map_lines=16, map_points_per_line=4)
  summary = convert.convert("nuscenes", tree.root, str(tmp_path / "out"), image_size=HW, clip_frames=4,
                            reader_kwargs=dict(version=tree.version, **sizes), progress=False)
  assert summary["clips"] >= 1 and summary["skipped_total"] == 0
  source = arrayrecord_source.ArrayRecordClipSource(tmp_path / "out")
  reader = NuScenesReader(tree.root, tree.version, num_frames=4, clip_stride_s=0.4, image_size=HW, **sizes)
  assert len(source) == summary["clips"] == len(reader.list_clips())
  for i in range(len(source)):
    got, want = source[i], reader.read_clip(source.clip_id(i))
    schema.validate(got)
    assert np.abs(got["images"].astype(int) - want["images"]).mean() < 3  # JPEG loss (sharp fixture edges).
    _assert_same_sample({k: v for k, v in got.items() if k != "images"},
                        {k: v for k, v in want.items() if k != "images"})


def test_argoverse2_clip_reader_path(tmp_path):
  """The Argoverse 2 reader converts clip by clip too, and reads back equal (geometry exactly)."""
  fx = pytest.importorskip("argoverse2_fixture")
  from cvd_storm_jax.data_pipelines.argoverse2 import Argoverse2Reader
  root = str(tmp_path / "av2")
  fx.write_av2_log(root)
  sizes = dict(max_boxes=8, max_lidar_points=64, max_map_lines=16, map_points_per_line=4)
  summary = convert.convert("argoverse2", root, str(tmp_path / "out"), image_size=HW, clip_frames=4,
                            reader_kwargs=sizes, progress=False)
  assert summary["clips"] >= 1 and summary["skipped_total"] == 0
  source = arrayrecord_source.ArrayRecordClipSource(tmp_path / "out")
  reader = Argoverse2Reader(root, num_frames=4, clip_stride_s=0.4, image_size=HW, **sizes)
  assert len(source) == summary["clips"] == len(reader.list_clips())
  for i in range(len(source)):
    got, want = source[i], reader.read_clip(source.clip_id(i))
    schema.validate(got)
    assert np.abs(got["images"].astype(int) - want["images"]).mean() < 3
    _assert_same_sample({k: v for k, v in got.items() if k != "images"},
                        {k: v for k, v in want.items() if k != "images"})


def test_clip_stride_is_in_frames_at_the_reader_rate(tmp_path):
  """nuScenes keyframes_only runs at 2 fps: the default stride is clip_frames keyframes (each keyframe stored once,
  not ~5 times with a stride computed at 10 fps), and --clip-stride is honoured by the clip readers."""
  fx = pytest.importorskip("nuscenes_fixture")
  tree = fx.write_nuscenes_tree(str(tmp_path / "nusc"))  # 3 keyframes, 0.5 s apart.
  kw = dict(version=tree.version, keyframes_only=True, load_lidar=False, max_boxes=8, max_map_lines=16,
            map_points_per_line=4)
  summary = convert.convert("nuscenes", tree.root, str(tmp_path / "out"), image_size=HW, clip_frames=2,
                            reader_kwargs=kw, progress=False)
  assert summary["clips"] == 1 and summary["records"] == 2
  summary = convert.convert("nuscenes", tree.root, str(tmp_path / "out1"), image_size=HW, clip_frames=2,
                            clip_stride=1, reader_kwargs=kw, progress=False)
  assert summary["clips"] == 2 and summary["records"] == 4
  with pytest.raises(ValueError, match="--clip-stride 1 .*conflicts with --reader-arg clip_stride_s"):
    convert.convert("nuscenes", tree.root, str(tmp_path / "out2"), image_size=HW, clip_frames=2, clip_stride=1,
                    reader_kwargs=dict(kw, clip_stride_s=0.5), progress=False)
  with pytest.raises(ValueError, match="--clip-stride 2 does not apply to the synthetic dataset"):
    convert.convert("synthetic", "unused", str(tmp_path / "out3"), image_size=(32, 56), clip_frames=2,
                    clip_stride=2, reader_kwargs=dict(num_clips=1), progress=False)


def test_argoverse2_honours_clip_stride(tmp_path):
  fx = pytest.importorskip("argoverse2_fixture")
  from cvd_storm_jax.data_pipelines.argoverse2 import Argoverse2Reader
  root = str(tmp_path / "av2")
  fx.write_av2_log(root)  # 11 sweeps at 10 Hz.
  kw = dict(load_lidar=False, max_boxes=8, max_map_lines=16, map_points_per_line=4)
  summary = convert.convert("argoverse2", root, str(tmp_path / "out"), image_size=HW, clip_frames=4, clip_stride=2,
                            reader_kwargs=kw, progress=False)
  assert summary["clips"] == len(Argoverse2Reader(root, num_frames=4, clip_stride_s=0.2, **kw).list_clips()) == 4


def _synthetic(out, **kw):
  args = dict(image_size=(32, 56), clip_frames=2, reader_kwargs=dict(num_clips=1, max_lidar_points=16),
              progress=False)
  return convert.convert("synthetic", "unused", str(out), **{**args, **kw})


def test_resume_with_other_settings_is_refused(tmp_path):
  """Done markers are keyed by scene only: resuming into a folder converted with another image size, clip length or
  reader argument would silently reuse its old shards, so it is refused, naming what differs."""
  # A first run that fails before any scene is done (a mistyped reader argument) does not block the corrected one.
  with pytest.raises(KeyError, match="unknown synthetic option"):
    _synthetic(tmp_path, reader_kwargs=dict(num_clip=1))
  summary = _synthetic(tmp_path)
  assert _synthetic(tmp_path) == summary  # Same settings: resumes (nothing left to do).
  with pytest.raises(ValueError, match=r"other settings \(clip_frames: 2 there, 3 now\)"):
    _synthetic(tmp_path, clip_frames=3)
  with pytest.raises(ValueError, match=r"image_size: \[32, 56\] there, \[48, 56\] now"):
    _synthetic(tmp_path, image_size=(48, 56))
  with pytest.raises(ValueError, match=r"reader_arg num_clips: 1 there, 2 now"):
    _synthetic(tmp_path, reader_kwargs=dict(num_clips=2, max_lidar_points=16))


def test_source_keeps_a_bounded_number_of_shards_open(tmp_path):
  """One clip per shard (nuScenes / AV2) means thousands of shards: the source keeps at most max_open_shards readers
  open (least recently used closed), also when read from several threads, and still pickles for grain workers."""
  import concurrent.futures
  import pickle
  if not os.path.isdir("/proc/self/fd"):
    pytest.skip("counts open files through /proc/self/fd")
  _synthetic(tmp_path, reader_kwargs=dict(num_clips=5, max_lidar_points=16))
  out = str(tmp_path)

  def open_shards():
    count = 0
    for fd in os.listdir("/proc/self/fd"):
      try:
        link = os.readlink(f"/proc/self/fd/{fd}")
      except FileNotFoundError:  # The fd of the listing itself, closed by now.
        continue
      count += link.startswith(out) and link.endswith(".array_record")
    return count

  source = arrayrecord_source.ArrayRecordClipSource(tmp_path, max_open_shards=2)
  assert len({source._clips[c]["frames"][0][0] for c in source._clip_ids}) == 5
  want = [source[i]["clip_id"] for i in range(5)] * 2
  for i in list(range(5)) * 2:
    source[i]
    assert len(source._readers) <= 2 and open_shards() <= 2
  assert len(list(source.captions())) == 5 * 2 * 6  # Every shard again, still within the bound.
  assert open_shards() <= 2
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    assert [s["clip_id"] for s in pool.map(source.__getitem__, list(range(5)) * 2)] == want
  assert len(source._readers) <= 2
  copy = pickle.loads(pickle.dumps(source))
  assert len(copy._readers) == 0 and copy[4]["clip_id"] == want[4]
  source.close()
  copy.close()
  assert open_shards() == 0
  with pytest.raises(ValueError, match="max_open_shards must be an int >= 1"):
    arrayrecord_source.ArrayRecordClipSource(tmp_path, max_open_shards=0)


def test_synthetic_through_the_production_path(tmp_path):
  """Synthetic clips -> converter -> ArrayRecord shards -> pipeline batch: geometry survives exactly."""
  from cvd_storm_jax.data_pipelines import pipeline, synthetic
  summary = convert.convert("synthetic", "unused", str(tmp_path / "out"), image_size=(32, 56), clip_frames=3,
                            reader_kwargs=dict(num_clips=2, max_lidar_points=256), progress=False)
  assert summary["clips"] == 2 and summary["skipped_total"] == 0
  source = arrayrecord_source.ArrayRecordClipSource(tmp_path / "out")
  reader = synthetic.SyntheticClipReader(num_clips=2, num_frames=3, image_size=(32, 56), max_lidar_points=256)
  got, want = source[0], reader.read_clip(source.clip_id(0))
  schema.validate(got)
  _assert_same_sample({k: v for k, v in got.items() if k not in ("images", "sky_mask")},
                      {k: v for k, v in want.items() if k not in ("images", "sky_mask")})
  config = pipeline.default_data_config("tiny")
  config.update(mix=(("arrayrecord", 1.0, str(tmp_path / "out")),), num_frames=3, buckets=((32, 56, 1.0),))
  batch = next(pipeline.make_iterator(config, seed=0))
  assert batch["images"].shape == (2, 3, 6, 32, 56, 3) and set(batch["dataset"]) == {"synthetic"}
