"""The wheel holds every kdet package and the model cards (pyproject lists packages by hand)."""
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_and_the_cards():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "kdet").rglob("__init__.py")}
    assert on_disk <= listed, f"add to pyproject [tool.setuptools] packages: {on_disk - listed}"
    assert config["package-dir"]["kdet.zoo_cards"] == "zoo/cards"
    assert config["package-data"]["kdet.zoo_cards"] == ["*.yaml"]
    assert len(list((ROOT / "zoo" / "cards").glob("*.yaml"))) >= 20


def test_installed_layout_finds_cards(tmp_path, monkeypatch):
    """As a wheel installs it (no zoo/ next to the package), the cards come from kdet/zoo_cards."""
    import shutil

    import kdet.zoo

    site = tmp_path / "site"
    shutil.copytree(ROOT / "kdet", site / "kdet", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "zoo" / "cards", site / "kdet" / "zoo_cards")
    monkeypatch.delenv(kdet.zoo.CARDS_ENV, raising=False)
    monkeypatch.setattr(kdet.zoo, "__file__", str(site / "kdet" / "zoo.py"))
    assert kdet.zoo.cards_dir() == site / "kdet" / "zoo_cards"
    assert "efficientdet_d0" in kdet.zoo.list_models()
