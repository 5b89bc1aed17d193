"""figures.py: what a radiologist needs on Figure 2b (orientation, CT window and slice, what the PCA was over)."""
import numpy as np
import pytest

import figures


def test_figure_2b_panels_carry_the_patients_orientation_and_the_ct_window():
    pytest.importorskip("matplotlib")
    gray, fmap = np.zeros((28, 28)), np.zeros((28, 28, 3))
    xray = figures.draw_map(gray, fmap, {"dataset": "phantom2d", "split": "test", "index": 0, "id": "a",
                                          "cardiomegaly": "positive"}, "S3", 14, pca_over="2D")
    ct = figures.draw_map(gray, fmap, {"dataset": "phantom3d", "split": "test", "index": 0, "id": "b",
                                        "cardiomegaly": "negative", "slice": {"index": 14, "of": 28}}, "S3", 14)
    for fig, letters in ((xray, {"S", "I", "R", "L"}), (ct, {"A", "P", "R", "L"})):
        for ax in fig.axes:
            marks = {t.get_text(): t.get_position() for t in ax.texts}
            assert set(marks) == letters
            assert marks["R"][0] < 0.5 < marks["L"][0]  # the patient's right on the image's left
    assert "W=2500" in ct.axes[0].get_title() and "slice 14 of 28" in ct.axes[0].get_title()
    assert "over the 2D examples" in xray._supxlabel.get_text()
    assert "over the 2D and 3D examples" in ct._supxlabel.get_text()
