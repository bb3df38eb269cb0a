"""`python -m ddq_jax predict` on the bundled sample image."""
import json
import os



from ddq_jax.serve import predict

SAMPLE = os.path.join(os.path.dirname(predict.__file__), 'assets', 'sample.jpg')


def test_predict_json_and_drawing(tiny_dir, tmp_path, capsys):
  weights = os.path.join(tiny_dir, 'checkpoint.pth')
  out = tmp_path / 'dets.json'
  assert predict.main([SAMPLE, '--weights', weights, '--score-threshold', '0',
                       '--draw', str(tmp_path / 'draw'), '--out',
                       str(out)]) == 0
  records = json.loads(out.read_text())
  assert len(records) == 50  # the tiny config keeps max_per_img = 50
  h, w = 225, 249
  for r in records:
    x, y, bw, bh = r['bbox']
    assert 0 <= x <= x + bw <= w + 1e-3 and 0 <= y <= y + bh <= h + 1e-3
    assert 0 <= r['category_id'] < 80 and isinstance(r['category_name'], str)
  scores = [r['score'] for r in records]
  assert scores == sorted(scores, reverse=True)
  assert (tmp_path / 'draw' / 'sample.png').stat().st_size > 0


def test_predict_bad_image(tiny_dir, tmp_path, capsys):
  bad = tmp_path / 'bad.jpg'
  bad.write_bytes(b'not an image')
  assert predict.main([str(bad), '--weights',
                       os.path.join(tiny_dir, 'checkpoint.pth')]) == 2
  assert 'not a decodable image' in capsys.readouterr().err

