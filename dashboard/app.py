"""Streamlit Pareto dashboard: reads a study storage (never writes) and follows running studies live.

Run through ``dse dashboard --storage URL`` (``streamlit run dashboard/app.py -- --storage URL``;
``$DSE_STORAGE`` is the default URL). Views, chosen in the sidebar (and in the page address, so a
view can be linked: ``?view=Study&study=NAME&trial=N``):

* **Studies**: every study in the storage with its spec summary, trials per state, last update;
* **Study**: the Pareto front on any two axes, a 3-objective view, hypervolume against trial number
  and the sortable trial table, refreshed every few seconds while trials arrive;
* **Trial**: the plan map, the accelerator the trial was costed on (its searched fields marked), the
  per-layer hardware breakdown, resources against the device, the evaluation by task, and the
  ``dse export`` bundle as a download;
* **Compare**: two trials side by side.

Data access is in :mod:`dse.reader` (the studies' overview, incremental trial reads), :mod:`dse.records`
(one trial's plan and per-layer report) and :mod:`dashboard.data`; figures in :mod:`dashboard.charts`.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timezone

import optuna
import pandas as pd
import streamlit as st

from dashboard import charts, data
from dse.reader import StorageError, TrialReader, existing_storage, study_overviews
from dse.records import TrialRecords
from dse.report import device_label, hardware_line, searched_fields

REFRESH_S = 5
VIEWS = ("Studies", "Study", "Trial", "Compare")


def storage_url() -> str:
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", default=os.environ.get("DSE_STORAGE", "sqlite:///dse-studies.db"))
    args, _ = parser.parse_known_args(sys.argv[1:])
    return args.storage


@st.cache_resource(show_spinner=False)
def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The storage, opened once per URL; raises StorageError (creating nothing) if it holds no studies."""
    return existing_storage(url)


@st.cache_resource(show_spinner=False)
def reader_for(url: str, name: str, study_id: int) -> TrialReader:
    """One incremental reader per study (``study_id``: a study deleted and created again is another),
    shared by every browser session."""
    return TrialReader(open_storage(url), name)


def load(url: str, name: str) -> tuple[optuna.Study, list, pd.DataFrame]:
    """The study, its light trials and their table."""
    reader = reader_for(url, name, open_storage(url).get_study_id_from_name(name))
    trials = reader.trials()
    return reader.study, trials, data.trials_frame(reader.study, trials)


def records_of(url: str, study: optuna.Study) -> TrialRecords:
    """The study's plans and per-layer reports (:mod:`dse.records`)."""
    return TrialRecords.of(study, open_storage(url))


def _param(key: str, default=None):
    return st.query_params.get(key, default)


# ------------------------------------------------------------------ views
def studies_view(url: str) -> None:
    rows = []
    for o in study_overviews(open_storage(url)):
        spec = o.user_attrs.get("spec", {})
        sampler = spec.get("sampler", {})
        rows.append({
            "study": o.name, "model": spec.get("model") or o.user_attrs.get("model"),
            "device": device_label(spec, o.user_attrs),
            **{state.lower(): o.states.get(state, 0) for state in ("COMPLETE", "RUNNING", "FAIL", "PRUNED", "WAITING")},
            "last update (UTC)": o.last_update.replace(tzinfo=timezone.utc) if o.last_update else None,
            "objectives": ", ".join(f"{n} ({d[:3]})" for n, d in zip(o.metric_names or
                                                                    [f"objective{i}" for i in range(len(o.directions))],
                                                                    o.directions)),
            "constraints": ", ".join(map(str, spec.get("constraints", []))),
            "space": ", ".join(g.get("name", "?") for g in spec.get("space", {}).get("groups", [])),
            "sampler": sampler.get("name"), "budget": spec.get("trials"),
        })
    st.subheader("Studies")
    st.caption(f"{len(rows)} stud{'y' if len(rows) == 1 else 'ies'} in {_display(url)}")
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="studies-table")


def study_view(url: str, name: str) -> None:
    study, trials, frame = load(url, name)
    spec = study.user_attrs.get("spec", {})
    st.subheader(name)
    searched = hardware_line(spec)
    st.caption(f"model {spec.get('model') or study.user_attrs.get('model')} · device "
               f"{device_label(spec, study.user_attrs)} · objectives "
               + ", ".join(f"{n} ({d.name.lower()})" for n, d in zip(study.metric_names or [], study.directions))
               + (f" · searched with the plan: {searched}" if searched else ""))
    if frame.empty:
        st.info("No trials yet; this page refreshes by itself.")
        return
    counts = frame["status"].value_counts()
    hv = data.hypervolume_frame(study, trials)
    cols = st.columns(6)
    for col, (label, value) in zip(cols, (
            ("complete", int((frame["status"].isin(("pareto", "feasible", "infeasible", "unrecorded"))).sum())),
            ("feasible", int(counts.get("pareto", 0) + counts.get("feasible", 0))),
            ("infeasible", int(counts.get("infeasible", 0))), ("Pareto", int(counts.get("pareto", 0))),
            ("running", int(counts.get("running", 0))),
            ("hypervolume", f"{hv['hypervolume'].iloc[-1]:.4f}" if len(hv) else "—"))):
        col.metric(label, value)
    options = data.axis_options(frame, study.metric_names or ())
    if len(options) < 2:
        st.info("Not enough measured quantities to plot yet.")
    else:
        objectives = [n for n in (study.metric_names or []) if n in options] or options
        left, right = st.columns(2)
        x = left.selectbox("x axis", options, key=f"x-{name}", format_func=_axis_label,
                           index=options.index(objectives[1]) if len(objectives) > 1 else 1)
        y = right.selectbox("y axis", options, key=f"y-{name}", format_func=_axis_label,
                            index=options.index(objectives[0]))
        st.plotly_chart(charts.pareto_scatter(frame, x, y), key=f"pareto-{name}", width="stretch")
        unplotted = frame[(frame["status"] == "infeasible") & frame[[x, y]].isna().any(axis=1)]
        if len(unplotted):
            missing = ", ".join(a for a in (x, y) if a in data.MODEL_AXES)
            st.caption(f"{len(unplotted)} infeasible trial{'s' * (len(unplotted) != 1)} screened out before "
                       f"evaluation (no {missing}): not drawn on these axes; pick two hardware axes to see them.")
        left, right = st.columns(2)
        with left:
            default3 = (objectives + [o for o in options if o not in objectives])[:3]
            axes3 = st.multiselect("3-objective view", options, default=default3, max_selections=3,
                                   key=f"xyz-{name}", format_func=_axis_label)
            rotate = st.toggle("rotate in 3D (WebGL)", key=f"rotate-{name}",
                               help="off: the third quantity is the colour (quicker to draw)")
            if len(axes3) == 3:
                st.plotly_chart(charts.pareto_3d(frame, axes3, rotate), key=f"pareto3d-{name}", width="stretch")
        with right:
            if len(hv):
                st.plotly_chart(charts.hypervolume_chart(hv), key=f"hv-{name}", width="stretch")
    st.markdown("**Trials** (click a column header to sort)")
    st.dataframe(frame, hide_index=True, width="stretch", key=f"table-{name}",
                 column_config={"finished": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss")})


def _axis_label(name: str) -> str:
    return data.AXES.get(name, (name,))[0]


def _display(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _trial_choices(frame: pd.DataFrame) -> list[int]:
    done = frame[frame["status"].isin(("pareto", "feasible", "infeasible", "unrecorded"))]
    pareto = done[done["status"] == "pareto"]["trial"].tolist()
    return pareto + [t for t in done["trial"].tolist() if t not in pareto]


def _choice_label(frame: pd.DataFrame):
    by_number = frame.set_index("trial")

    def label(number: int) -> str:
        row = by_number.loc[number]
        extra = f" · {row['warm_start']}" if isinstance(row.get("warm_start"), str) else ""
        return f"trial {number} · {row['status']}{extra}"
    return label


def trial_of(trials, number: int) -> optuna.trial.FrozenTrial:
    return next(t for t in trials if t.number == number)


def trial_details(study: optuna.Study, trial: optuna.trial.FrozenTrial, key: str, records: TrialRecords) -> None:
    from dse.export import trial_accelerator
    from dse.study import full_result

    hw = records.report(trial) or {}
    plan = records.plan(trial)
    if plan:
        labels, bits = data.plan_grid(plan, study.user_attrs.get("workload"))
        st.plotly_chart(charts.plan_map(labels, bits, f"Plan map, trial {trial.number}"), key=f"map-{key}",
                        width="stretch")
    else:
        st.info("This trial has no stored plan.")
    accelerator = trial_accelerator(study, trial, records)
    if accelerator:
        searched = searched_fields(study.user_attrs.get("spec", {}))
        st.markdown("**Accelerator** (the design this trial was costed on"
                    + (f"; searched: {', '.join(searched)})" if searched else ")"))
        st.dataframe(data.accelerator_frame(accelerator, searched), hide_index=True, width="stretch",
                     key=f"accel-{key}")
    if hw:
        st.plotly_chart(charts.resource_chart(data.resource_frame(hw), hw.get("device", "")), key=f"res-{key}",
                        width="stretch")
        layers = data.layer_frame(hw)
        if len(layers):
            bound = layers["bound"].value_counts()
            st.caption(f"{bound.get('memory', 0)} memory-bound and {bound.get('compute', 0)} compute-bound rows; "
                       f"{hw.get('decode_ms_per_token', float('nan')):.3f} ms per decode step at "
                       f"{hw.get('clock_mhz', float('nan')):g} MHz")
            st.plotly_chart(charts.layer_chart(layers), key=f"layers-{key}", width="stretch")
            st.dataframe(layers, hide_index=True, width="stretch", key=f"layer-table-{key}")
    else:
        st.info("This trial has no stored hardware report.")
    evaluation = data.evaluation_frame(trial.user_attrs, full_result(study, trial))
    st.markdown("**Evaluation by task**")
    if evaluation.empty:
        st.caption("not evaluated (screened out by the cost model, or not finished)")
    else:
        st.dataframe(evaluation, hide_index=True, width="stretch", key=f"eval-{key}")


def trial_view(url: str, name: str) -> None:
    from dse.export import bundle_zip

    study, trials, frame = load(url, name)
    choices = _trial_choices(frame) if not frame.empty else []
    if not choices:
        st.info("No finished trials yet.")
        return
    wanted = _param("trial")
    index = choices.index(int(wanted)) if wanted and wanted.isdigit() and int(wanted) in choices else 0
    number = st.selectbox("trial", choices, index=index, format_func=_choice_label(frame), key=f"trial-{name}")
    st.query_params["trial"] = str(number)
    trial, records = trial_of(trials, number), records_of(url, study)
    row = frame.set_index("trial").loc[number]
    st.subheader(f"{name}: trial {number}")
    hw_cells = [f"{c.removeprefix('hw.')} {row[c]}" for c in row.index if c.startswith("hw.") and pd.notna(row[c])]
    st.caption(" · ".join([str(row["status"]), *hw_cells, str(row.get("plan", ""))]))
    if records.plan(trial) is not None:
        st.download_button("Export bundle (plan.yaml, accelerator.yaml, hw_report.json, evaluation.json, "
                           "summary.txt)",
                           lambda: bundle_zip(study, trial, records), file_name=f"{name}-trial{number}.zip",
                           mime="application/zip", key=f"export-{name}-{number}", on_click="ignore")
    trial_details(study, trial, f"{name}-{number}", records)


def compare_view(url: str, name: str) -> None:
    study, trials, frame = load(url, name)
    choices = _trial_choices(frame) if not frame.empty else []
    if len(choices) < 2:
        st.info("Comparing needs two finished trials.")
        return
    label = _choice_label(frame)
    left, right = st.columns(2)
    a = left.selectbox("trial A", choices, index=0, format_func=label, key=f"cmp-a-{name}")
    b = right.selectbox("trial B", choices, index=1, format_func=label, key=f"cmp-b-{name}")
    rows = frame.set_index("trial", drop=False)
    st.markdown("**Figures**")
    st.dataframe(data.compare_frame(rows.loc[a], rows.loc[b]), hide_index=True, width="stretch", key="cmp-figures")
    ta, tb, records = trial_of(trials, a), trial_of(trials, b), records_of(url, study)
    diff = data.plan_diff(records.plan(ta) or {}, records.plan(tb) or {})
    st.markdown(f"**Plan differences** ({len(diff)} units)")
    st.dataframe(diff, hide_index=True, width="stretch", key="cmp-diff")
    for col, trial in zip(st.columns(2), (ta, tb)):
        with col:
            trial_details(study, trial, f"cmp-{trial.number}", records)


# ------------------------------------------------------------------ page
def main() -> None:
    st.set_page_config(page_title="dse: Pareto dashboard", layout="wide")
    st.title("Hardware-aware compression studies")
    url = storage_url()
    try:
        overviews = study_overviews(open_storage(url))
    except StorageError as err:  # the storage is user input: one line on the page, no traceback
        st.error(f"storage: {err}")
        return
    if not overviews:
        st.info(f"No studies in {_display(url)} yet.")
        return
    names = [o.name for o in overviews]
    wanted_view, wanted_study = _param("view", "Study"), _param("study")
    view = st.sidebar.radio("view", VIEWS, index=VIEWS.index(wanted_view) if wanted_view in VIEWS else 1, key="view")
    name = st.sidebar.selectbox("study", names, index=names.index(wanted_study) if wanted_study in names else 0,
                                key="study")
    refresh = st.sidebar.number_input("refresh every (s)", min_value=1, max_value=600, value=REFRESH_S, key="refresh")
    st.sidebar.caption(f"reading {_display(url)}")
    st.query_params.update({"view": view, "study": name})

    if view == "Studies":
        st.fragment(studies_view, run_every=refresh)(url)
    elif view == "Study":
        st.fragment(study_view, run_every=refresh)(url, name)
    elif view == "Trial":
        trial_view(url, name)
    else:
        compare_view(url, name)


main()
