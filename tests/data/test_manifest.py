import pytest

from slidessl.data.errors import ManifestError
from slidessl.data.manifest import default_patient, load_manifest


@pytest.fixture
def slides(slide_factory):
    return [slide_factory(n=30, name=f"s{i}")[0] for i in range(4)]


def test_csv_with_relative_and_absolute_paths(tmp_path, slides):
    text = (
        "slide_id,path,case_id,EGFR,TP53,subtype\n"
        f"a,{slides[0].name},P1,1,0,luad\n"
        f"b,{slides[1]},P1,0,,lusc\n"
        f"c,{slides[2].name},,0,1,luad\n"
    )
    (tmp_path / "m.csv").write_text(text)
    m = load_manifest(tmp_path / "m.csv")
    assert [e.slide_id for e in m] == ["a", "b", "c"]
    assert [e.path for e in m] == [slides[0], slides[1], slides[2]]
    assert [e.patient_id for e in m] == ["P1", "P1", "c"]  # empty patient -> slide id
    assert m.label_columns == ["EGFR", "TP53", "subtype"]
    assert m.labels("TP53") == ["0", "", "1"]
    assert m.source == tmp_path / "m.csv"


@pytest.mark.parametrize("alias", ["patient_id", "case_id", "pat_id"])
def test_tsv_and_patient_aliases(tmp_path, slides, alias):
    rows = [f"slide_id\tpath\t{alias}\tlabel"] + [
        f"x{i}\t{p.name}\tpat{i % 2}\t{i}" for i, p in enumerate(slides)
    ]
    (tmp_path / "m.tsv").write_text("\n".join(rows) + "\n")
    m = load_manifest(tmp_path / "m.tsv")
    assert [e.patient_id for e in m] == ["pat0", "pat1", "pat0", "pat1"]
    assert m.label_columns == ["label"]


def test_stride_column_is_not_a_label(tmp_path, slides):
    (tmp_path / "m.csv").write_text(f"slide_id,path,stride,y\na,{slides[0].name},448,1\n")
    m = load_manifest(tmp_path / "m.csv")
    assert m[0].stride == 448.0 and m.label_columns == ["y"]


def test_every_duplicate_and_missing_file_listed_at_once(tmp_path, slides):
    text = (
        "slide_id,path\n"
        f"a,{slides[0].name}\na,{slides[1].name}\nb,gone1.h5\nc,gone2.h5\nd,{slides[2].name}\n"
        f"d,{slides[3].name}\n"
    )
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "m.csv")
    problems = info.value.problems
    assert sum("duplicate slide_id" in p for p in problems) == 2
    assert sum("missing file" in p for p in problems) == 2
    assert "gone1.h5" in str(info.value) and "gone2.h5" in str(info.value)


def test_missing_required_column(tmp_path):
    (tmp_path / "m.csv").write_text("slide,file\na,b.h5\n")
    with pytest.raises(ManifestError, match="missing column 'slide_id'"):
        load_manifest(tmp_path / "m.csv")


def test_ragged_rows_and_bad_stride(tmp_path, slides):
    (tmp_path / "m.csv").write_text(
        f"slide_id,path,stride\na,{slides[0].name},abc\nb,{slides[1].name}\n"
    )
    with pytest.raises(ManifestError, match="line 3: 2 fields"):
        load_manifest(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text(f"slide_id,path,stride\na,{slides[0].name},-2\n")
    with pytest.raises(ManifestError, match="not a positive number"):
        load_manifest(tmp_path / "m.csv")


def test_empty_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("slide_id,path\n")
    with pytest.raises(ManifestError, match="no slides listed"):
        load_manifest(tmp_path / "m.csv")


def test_folder_scan_prefers_h5_over_pt(tmp_path, rng, layouts):
    (tmp_path / "h5_files").mkdir()
    (tmp_path / "pt_files").mkdir()
    for name in ("TCGA-AB-1234-01Z", "TCGA-AB-1234-02Z", "other"):
        grid = layouts.random_grid(rng, 20, 10)
        layouts.clam(tmp_path / "h5_files" / f"{name}.h5", rng.standard_normal((20, 4)), grid)
        layouts.torch.save(layouts.torch.zeros(20, 4), tmp_path / "pt_files" / f"{name}.pt")
    m = load_manifest(tmp_path)
    assert sorted(e.slide_id for e in m) == ["TCGA-AB-1234-01Z", "TCGA-AB-1234-02Z", "other"]
    assert all(e.path.suffix == ".h5" for e in m)
    assert {e.patient_id for e in m} == {"TCGA-AB-1234", "other"}


def test_folder_scan_duplicates_listed(tmp_path, slide_factory):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path, *_ = slide_factory(n=10, name="x")
    for sub in ("a", "b"):
        (tmp_path / sub / "x.h5").write_bytes(path.read_bytes())
    path.unlink()
    with pytest.raises(ManifestError, match="duplicate slide_id 'x'"):
        load_manifest(tmp_path)


def test_folder_with_manifest_uses_it(tmp_path, slides):
    (tmp_path / "manifest.csv").write_text(f"slide_id,path,y\nonly,{slides[0].name},1\n")
    m = load_manifest(tmp_path)
    assert [e.slide_id for e in m] == ["only"] and m.label_columns == ["y"]


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no slide files"):
        load_manifest(tmp_path / "empty")
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(tmp_path / "nothing.csv")


def test_default_patient_from_tcga_barcode():
    assert default_patient("TCGA-05-4244-01Z-00-DX1.d4ff32cd") == "TCGA-05-4244"
    assert default_patient("slide_17") == "slide_17"
