//! The evaluation report as text.

use std::fmt;

use super::EvalReport;

/// Values as a comma-separated list.
fn list(values: impl Iterator<Item = f64>) -> String {
    values
        .map(|v| format!("{v:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl EvalReport {
    fn write_losses(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<14} {:>8} {:>8} {:>10} {:>8}",
            "domain", "loss", "± s.e.", "perplexity", "windows"
        )?;
        for l in &self.losses {
            writeln!(
                f,
                "{:<14} {:>8.4} {:>8.4} {:>10.3} {:>8}",
                l.domain, l.loss, l.stderr, l.perplexity, l.windows
            )?;
        }
        Ok(())
    }

    fn write_tables(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for t in &self.tables {
            write!(
                f,
                "\nlayer {} routing (share of each domain's assignments per expert), NMI {:.3} ({:.2} of reachable)",
                t.layer, t.nmi, t.nmi_of_max
            )?;
            if let (Some(c), Some(doc)) = (t.conditional_mi, t.document_mi) {
                write!(f, ", I(D;E|token) {c:.4} nats, I(doc;E|D) {doc:.4} nats")?;
            }
            writeln!(f)?;
            let experts = t.shares.first().map_or(0, Vec::len);
            write!(f, "{:<14}", "")?;
            for e in 0..experts {
                write!(f, " {:>5}", format!("e{e}"))?;
            }
            writeln!(f)?;
            for (d, row) in self.domains.iter().zip(&t.shares) {
                write!(f, "{d:<14}")?;
                for s in row {
                    write!(f, " {:>5.2}", s)?;
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_losses(f)?;
        self.write_tables(f)?;
        if self.tables.is_empty() {
            return Ok(());
        }
        writeln!(
            f,
            "\nmean over MoE layers: NMI(domain; expert) {:.3} (layers {}), {:.3} of reachable",
            self.mean_nmi,
            list(self.tables.iter().map(|t| t.nmi)),
            self.mean_nmi_of_max,
        )?;
        if let Some(c) = self.mean_conditional_mi {
            let layers = self.tables.iter().filter_map(|t| t.conditional_mi);
            writeln!(
                f,
                "mean I(domain; expert | current token): {c:.4} nats (layers {})",
                list(layers)
            )?;
        }
        for c in &self.controls {
            write!(
                f,
                "random-router control, {}: NMI {:.3}, {:.3} of reachable",
                c.name, c.nmi, c.nmi_of_max
            )?;
            if let Some(cmi) = c.conditional_mi {
                write!(f, ", I(D;E|token) {cmi:.4} nats")?;
            }
            writeln!(f, " (95% intervals over {} draws)", c.nmi.n)?;
            if let Some(layers) = &c.layers_conditional_mi {
                writeln!(
                    f,
                    "  I(D;E|token) by layer: {}",
                    list(layers.iter().copied())
                )?;
            }
        }
        Ok(())
    }
}
