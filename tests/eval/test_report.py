from slidessl.eval.report import verdicts


def row(method, task, mean, std, ci):
    return {"method": method, "task": task, "auroc_mean": mean, "auroc_std": std, "auroc_ci": ci}


def test_verdict_says_plainly_when_the_focus_method_loses_or_is_at_chance():
    rows = [
        row("pretrained", "infiltrated", 0.48, 0.05, [0.40, 0.56]),
        row("meanpool", "infiltrated", 0.52, 0.04, [0.45, 0.60]),
        row("pretrained", "tumor_high", 0.95, 0.01, [0.92, 0.97]),
        row("meanpool", "tumor_high", 0.90, 0.02, [0.86, 0.93]),
        row("pretrained", "subtype", 0.53, 0.06, [0.45, 0.61]),
        row("abmil", "subtype", 0.51, 0.05, [0.44, 0.58]),
    ]
    v = {line.split("`")[1]: line for line in verdicts(rows, "pretrained")}
    assert "does NOT beat" in v["infiltrated"] and "0.480" in v["infiltrated"]
    assert "meanpool 0.520" in v["infiltrated"] and "contains 0.5" in v["infiltrated"]
    assert "beats every baseline" in v["tumor_high"] and "+0.050" in v["tumor_high"]
    assert "does not clearly beat" in v["subtype"] and "contains 0.5" in v["subtype"]
    assert verdicts(rows, None) == [] and verdicts(rows, "missing") == []
