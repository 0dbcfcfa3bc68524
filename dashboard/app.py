"""Streamlit Pareto dashboard: reads a study storage (never writes trials) and plots the fronts live.

Run through ``dse dashboard --storage URL``, which calls
``streamlit run dashboard/app.py -- --storage URL`` (``$DSE_STORAGE`` is the default URL).
"""

from __future__ import annotations

import argparse
import os
import sys

import optuna
import pandas as pd
import plotly.express as px
import streamlit as st

from dse.report import pareto_trials, state_counts, trial_row
from dse.study import full_results

REFRESH_S = 5


def storage_url() -> str:
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", default=os.environ.get("DSE_STORAGE", "sqlite:///dse-studies.db"))
    args, _ = parser.parse_known_args(sys.argv[1:])
    return args.storage


@st.cache_resource
def open_storage(url: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(url, skip_table_creation=True)


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per completed trial (full-fidelity results where promoted), with ``status`` pareto | feasible |
    infeasible; objective values a screened-out trial never measured (infinite proxy KL) are blank."""
    pareto = {t.number for t in pareto_trials(study)}
    full = full_results(study)
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        row = {k: (None if isinstance(v, float) and v == float("inf") else v)
               for k, v in trial_row(study, trial, full.get(trial.number)).items()}
        evaluated = trial.user_attrs.get("evaluated")
        row["status"] = "pareto" if trial.number in pareto else ("feasible" if evaluated else "infeasible")
        rows.append(row)
    return pd.DataFrame(rows)


def study_view(storage: optuna.storages.RDBStorage, name: str) -> None:
    study = optuna.load_study(study_name=name, storage=storage)
    spec = study.user_attrs.get("spec", {})
    counts = state_counts(study)
    st.subheader(name)
    st.caption(f"model {spec.get('model')} · device {spec.get('hardware', {}).get('device')} · "
               + " · ".join(f"{k.lower()} {v}" for k, v in counts.items() if v))
    frame = trials_frame(study)
    if frame.empty:
        st.info("No completed trials yet; this page refreshes by itself.")
        return
    numeric = [c for c in frame.columns if c not in ("trial", "plan", "status") and pd.api.types.is_numeric_dtype(frame[c])]
    metric_names = list(study.metric_names or numeric[:2])
    left, right = st.columns(2)
    x = left.selectbox("x axis", numeric, index=numeric.index(metric_names[1]) if len(metric_names) > 1 else 0, key=f"x-{name}")
    y = right.selectbox("y axis", numeric, index=numeric.index(metric_names[0]), key=f"y-{name}")
    fig = px.scatter(frame, x=x, y=y, color="status", hover_data=["trial", "plan"],
                     color_discrete_map={"pareto": "#d62728", "feasible": "#1f77b4", "infeasible": "#bbbbbb"},
                     title="Pareto front")
    front = frame[frame["status"] == "pareto"].sort_values(x)
    fig.add_scatter(x=front[x], y=front[y], mode="lines", line={"color": "#d62728", "dash": "dot"},
                    name="front", showlegend=False)
    st.plotly_chart(fig, width="stretch", key=f"pareto-{name}")
    st.dataframe(frame.sort_values("trial"), hide_index=True, width="stretch")


def main() -> None:
    st.set_page_config(page_title="dse: Pareto dashboard", layout="wide")
    st.title("Hardware-aware compression studies")
    url = storage_url()
    try:
        storage = open_storage(url)
        summaries = optuna.study.get_all_study_summaries(storage)
    except Exception as err:  # the storage is user input: show it, do not crash the page
        st.error(f"cannot read storage {url}: {str(err).splitlines()[0]}")
        return
    if not summaries:
        st.info(f"No studies in {url} yet.")
        return
    names = [s.study_name for s in summaries]
    name = st.sidebar.selectbox("study", names)

    @st.fragment(run_every=REFRESH_S)
    def live() -> None:
        study_view(storage, name)

    live()


main()
