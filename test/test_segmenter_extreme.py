"""One finite point far out (1e15 m) cost the whole frame ('coordinate range too large to hash'): now such points
get label 0 and are counted, and the rest of the cloud is segmented exactly as without them (issue 14 item 4)."""
import numpy as np
import pytest
import torch

from conftest import require_data


@pytest.fixture(scope="module")
def segmenter():
    from sal_ros.model.config import ModelConfig
    from sal_ros.model.sal import SALModel
    from sal_ros.core.cloud_input import SegmenterConfig
    from sal_ros.model.segmenter import Segmenter
    from sal_ros.model.text_encoder import tiny_text_encoder
    from sal_ros.model.vocabulary import Vocabulary

    torch.manual_seed(0)
    torch.set_num_threads(1)
    seg = Segmenter(SALModel(ModelConfig.preset("tiny")).eval(), "cpu", config=SegmenterConfig(score_threshold=0.0))
    seg.set_embeddings(tiny_text_encoder().encode(Vocabulary.from_prompts(["car", "road", "tree"])))
    return seg


@pytest.mark.parametrize("far", [1e15, -3e38, 2e4])
def test_far_points_are_left_out_and_the_rest_segmented_as_without_them(segmenter, far):
    scan = np.fromfile(require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin"), np.float32)
    xyz = scan.reshape(-1, 4)[:20000, :3].copy()
    reference = segmenter.segment(xyz)
    bad = np.insert(xyz, [5, 100], [[far, 0.0, 1.0], [1.0, far, np.nan]], axis=0)  # one far, one far and NaN
    out = segmenter.segment(bad)
    keep = np.ones(len(bad), bool)
    keep[[5, 101]] = False
    assert out.label[~keep].tolist() == [0, 0] and out.instance[~keep].tolist() == [0, 0]
    assert out.dropped_points == {"nonfinite": 1, "out_of_range": 1}
    np.testing.assert_array_equal(out.label[keep], reference.label)
    np.testing.assert_array_equal(out.instance[keep], reference.instance)
    assert reference.dropped_points == {"nonfinite": 0, "out_of_range": 0}
