"""The sweep comparison page: one point and one row per SAE, names escaped, no script."""

from tools.html.sweep import render_sweep_index


def test_sweep_page_plots_every_sae_and_escapes_names(tmp_path):
    saes = [
        {"name": "l1-a", "l1_coeff": 0.5, "l0": 40.0, "explained_variance": 0.95, "dead_fraction": 0.0,
         "loss_recovered": 0.99, "simulation_all_mean": 0.5},
        {"name": '<img src=x onerror="alert(1)">', "l1_coeff": 1.0, "l0": 12.0, "explained_variance": 0.9,
         "dead_fraction": 0.01, "loss_recovered": 0.95},
        {"name": "unfinished", "l1_coeff": 2.0, "l0": None, "loss_recovered": None},
    ]
    page = render_sweep_index(tmp_path, saes).read_text(encoding="utf-8")
    assert page.count("<circle") == 2  # the SAE without figures is listed but not plotted
    assert page.count("<tr><td>") == 3
    assert "<img" not in page and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert '<a href="../features/l1-a/site/index.html">' in page
    assert "<script" not in page and "Content-Security-Policy" in page
    assert (tmp_path / "sweep" / "static" / "site.css").is_file()


def test_frontier_page_links_every_point_and_the_sweep_page_links_it(tmp_path):
    from tools.html.sweep import render_frontier

    results = [{"arch": a, "setting": f"k={k}", "name": f"f-{a}-k{k}", "l0": float(k), "fvu": 0.5 / k,
                "dead_fraction": 0.01, "loss_recovered": 0.9}
               for a in ("topk", "batchtopk") for k in (16, 32, 64)]
    results.append({"arch": "l1", "setting": "l1_coeff=0.1", "name": "<b>", "l0": float("nan"),
                    "fvu": float("nan"), "dead_fraction": 0.0, "loss_recovered": float("nan")})
    page = render_frontier(tmp_path, results).read_text(encoding="utf-8")
    assert page.count('<a href="../features/f-') == 12  # 6 points + 6 table rows
    assert page.count("<polyline") == 2 and "<b>" not in page and "&lt;b&gt;" in page
    assert "<script" not in page
    sweep = render_sweep_index(tmp_path, []).read_text(encoding="utf-8")
    assert 'href="frontier.html"' in sweep
